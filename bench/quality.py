"""Sample quality of each recipe after a fixed CPU budget: FID-digits and class coverage for the
digits recipes, mode coverage for the 2-D mixtures.

Digits recipes train for --minutes each on sklearn's digits (1 process), then
`ganforge eval --metrics fid,classes --n N --json` scores the EMA generator with ganforge's own
digits classifier as the feature extractor (offline "FID-digits": comparable between runs on
the same data, not with Inception FIDs). The 2-D recipes train their full step count on a
20,000-point mixture and are scored with `--metrics modes`.

Last stdout line: JSON {"recipes": {recipe: {metric: value, ...}}, "minutes": budget}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DIGITS = ["dcgan_digits", "dcgan_digits_cond", "wgan_gp_digits", "wgan_clip_digits", "sngan_hinge_digits"]
POINTS = {"wgan_gp_grid25": "grid25", "gan_ring8": "ring8"}


def ganforge(*args: str) -> str:
    env = dict(os.environ, WORLD_SIZE="1")
    out = subprocess.run([os.path.join(BIN, "ganforge"), *args], check=True, env=env, cwd=REPO,
                         capture_output=True, text=True)
    return out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=1.5, help="training budget per digits recipe")
    p.add_argument("--n", type=int, default=1000, help="samples per evaluation")
    p.add_argument("--only", nargs="*", help="recipes to run (default: all)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="ganforge-bench-quality-")
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
        data, run = f"{work}/{mixture}", f"{work}/runs/{recipe}"
        ganforge("data", "make-shards", "--source", "gaussians", "--mixture", mixture, "--n", "20000", "--out", data)
        ganforge("train", "--config", f"configs/{recipe}.yaml", f"data.train={data}", f"run.dir={run}",
                 "log.mlflow_uri=none")
        scores = json.loads(ganforge("eval", "--run", run, "--metrics", "modes", "--json").strip().splitlines()[-1])
        results[recipe] = {k: scores[k] for k in ("step", "modes_covered", "modes_total", "high_quality")}
        print(f"{recipe:>20}: {results[recipe]}", flush=True)
    print(json.dumps({"minutes": args.minutes, "n": args.n, "recipes": results}))


if __name__ == "__main__":
    main()
