"""Sample quality of each recipe after a fixed CPU budget: FID-digits and class coverage for the
digits recipes, mode coverage for the 2-D mixtures.

Digits recipes train for --minutes each on sklearn's digits (1 process), then
`ganforge eval --metrics fid,classes --n N --json` scores the EMA generator with ganforge's own
digits classifier as the feature extractor (offline "FID-digits": comparable between runs on
the same data, not with Inception FIDs). The 2-D recipes train their full step count on a
mixture of --points points, once per --seeds seed, and are scored with `--metrics modes`. The
translation recipes (CycleGAN, pix2pix) train --translation-steps steps on their packaged data
(built on first use) and report the held-out figures logged at the last step. The
super-resolution recipe (esrgan_cpu) trains as written on its packaged photographs (built on
first use) and reports held-out PSNR/SSIM (Y channel, `scale` border pixels cropped) at the end
of its PSNR stage and at its last step, beside bicubic upscaling's; --grids copies its sample
grids (LR | bicubic | ganforge | HR) there.

Last stdout line: JSON {"recipes": {recipe: {metric: value, ...}}, "minutes": budget}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DIGITS = ["dcgan_digits", "dcgan_digits_cond", "wgan_gp_digits", "wgan_clip_digits", "sngan_hinge_digits"]
POINTS = {"wgan_gp_grid25": "grid25", "gan_ring8": "ring8"}
TRANSLATION = ("pix2pix_edges", "cyclegan_sample_images")
SUPER_RESOLUTION = ("esrgan_cpu",)


def ganforge(*args: str, cwd: str = REPO) -> str:
    env = dict(os.environ, WORLD_SIZE="1")
    out = subprocess.run([os.path.join(BIN, "ganforge"), *args], check=True, env=env, cwd=cwd,
                         capture_output=True, text=True)
    return out.stdout


def last_held_out(run: str) -> dict:
    """The held-out figures (val/*) of the last sample step in a run's metrics.jsonl."""
    found: dict = {}
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if any(k.startswith("val/") for k in rec):
                found = {k: round(v, 4) for k, v in rec.items() if k.startswith("val/") or k == "step"}
    return found


def held_out_at(run: str, step: int) -> dict:
    """The held-out figures (val/*) logged at `step` in a run's metrics.jsonl."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if rec["step"] == step and "val/psnr" in rec:
                return rec
    raise SystemExit(f"{run}: no held-out figures at step {step}")


def super_resolution(recipe: str, work: str, grids: str | None) -> dict:
    """Train the recipe as written; PSNR/SSIM at the end of its PSNR stage and at its last step."""
    import yaml

    with open(os.path.join(REPO, "configs", f"{recipe}.yaml")) as f:
        train = yaml.safe_load(f)["train"]
    run = f"{work}/runs/{recipe}"
    started = time.perf_counter()
    ganforge("train", "--config", os.path.join(REPO, "configs", f"{recipe}.yaml"), f"run.dir={run}",
             "log.mlflow_uri=none", cwd=work)
    seconds = time.perf_counter() - started
    psnr_stage, last = held_out_at(run, train["pretrain_steps"]), held_out_at(run, train["max_steps"])
    if grids:
        os.makedirs(grids, exist_ok=True)
        for name, step in (("psnr_stage", train["pretrain_steps"]), ("gan_stage", train["max_steps"])):
            shutil.copy(f"{run}/samples/step_{step:08d}.png", os.path.join(grids, f"{recipe}_{name}.png"))
    return {"psnr_stage_db": round(psnr_stage["val/psnr"], 3), "gan_stage_db": round(last["val/psnr"], 3),
            "bicubic_db": round(last["val/psnr_bicubic"], 3), "ssim_psnr_stage": round(psnr_stage["val/ssim"], 4),
            "ssim_gan_stage": round(last["val/ssim"], 4), "ssim_bicubic": round(last["val/ssim_bicubic"], 4),
            "psnr_stage_gain_db": round(psnr_stage["val/psnr"] - last["val/psnr_bicubic"], 3),
            "pretrain_steps": train["pretrain_steps"], "steps": train["max_steps"], "wall_s": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=1.5, help="training budget per digits recipe")
    p.add_argument("--n", type=int, default=1000, help="samples per evaluation")
    p.add_argument("--only", nargs="*", help="recipes to run (default: all)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0], help="seeds of the 2-D recipes (default 0)")
    p.add_argument("--points", type=int, default=100_000, help="points in each 2-D mixture")
    p.add_argument("--translation-steps", type=int, default=2000, help="steps of each translation recipe")
    p.add_argument("--grids", help="copy the super-resolution sample grids into this folder")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="ganforge-bench-quality-")
    if not args.only or set(args.only) & set(DIGITS):
        ganforge("data", "make-shards", "--source", "digits", "--out", f"{work}/digits")
    results: dict[str, dict] = {}
    for recipe in DIGITS:
        if args.only and recipe not in args.only:
            continue
        run = f"{work}/runs/{recipe}"
        ganforge("train", "--config", f"configs/{recipe}.yaml", f"data.train={work}/digits", f"run.dir={run}",
                 "train.max_steps=1000000", f"train.max_minutes={args.minutes}", "log.mlflow_uri=none")
        scores = json.loads(ganforge("eval", "--run", run, "--metrics", "fid,classes", "--n", str(args.n),
                                     "--json").strip().splitlines()[-1])
        results[recipe] = {k: scores[k] for k in ("step", "fid", "classes_covered", "class_kl") if k in scores}
        print(f"{recipe:>20}: {results[recipe]}", flush=True)
    for recipe, mixture in POINTS.items():
        if args.only and recipe not in args.only:
            continue
        data = f"{work}/{mixture}"
        ganforge("data", "make-shards", "--source", "gaussians", "--mixture", mixture, "--n", str(args.points),
                 "--out", data)
        per_seed = []
        for seed in args.seeds:
            run = f"{work}/runs/{recipe}-seed{seed}"
            ganforge("train", "--config", f"configs/{recipe}.yaml", f"data.train={data}", f"run.dir={run}",
                     f"seed={seed}", "log.mlflow_uri=none")
            scores = json.loads(ganforge("eval", "--run", run, "--metrics", "modes", "--json").strip().splitlines()[-1])
            per_seed.append({k: scores[k] for k in ("step", "modes_covered", "modes_total", "high_quality")} | {"seed": seed})
            print(f"{recipe:>20}: {per_seed[-1]}", flush=True)
        results[recipe] = {"seeds": per_seed,
                           "mean_modes_covered": sum(r["modes_covered"] for r in per_seed) / len(per_seed),
                           "mean_high_quality": round(sum(r["high_quality"] for r in per_seed) / len(per_seed), 4)}
    for recipe in TRANSLATION:
        if args.only and recipe not in args.only:
            continue
        run = f"{work}/runs/{recipe}"
        ganforge("train", "--config", os.path.join(REPO, "configs", f"{recipe}.yaml"), f"run.dir={run}",
                 f"train.max_steps={args.translation_steps}", "log.mlflow_uri=none", cwd=work)
        results[recipe] = last_held_out(run)
        print(f"{recipe:>20}: {results[recipe]}", flush=True)
    for recipe in SUPER_RESOLUTION:
        if args.only and recipe not in args.only:
            continue
        results[recipe] = super_resolution(recipe, work, args.grids)
        print(f"{recipe:>20}: {results[recipe]}", flush=True)
    print(json.dumps({"minutes": args.minutes, "n": args.n, "recipes": results}))


if __name__ == "__main__":
    main()
