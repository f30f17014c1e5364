"""Mode coverage on PacGAN's benchmarks (grid25, ring8, Stacked-MNIST) over several seeds, beside the published rows.

Each benchmark trains its recipe once per seed (one process at a time, `train.threads` as
--threads) on data written once into --cache, then scores the EMA generator with the PacGAN
protocol:

- grid25, ring8: a 100,000-point mixture; `ganforge eval --metrics modes --n 2500 --json`
  (2,500 samples, a sample is of high quality within 3 standard deviations of its nearest
  centre, a mode is covered when it holds one such sample). 5 seeds by default.
- stacked: 25,600 Stacked-MNIST images (three MNIST digits as R, G, B; 1,000 modes);
  `ganforge eval --metrics stacked --n 26000 --json` (each channel read by ganforge's MNIST
  classifier; modes covered, KL of the mode histogram to uniform, and the stricter figures:
  the fraction of samples whose three digits are each read with probability >= 0.9, and the
  modes among those). 3 seeds by default.

    python bench/modes.py [--only grid25|ring8|stacked] [--seeds N] [--threads T]
                          [--config-ring8 F] [--config-grid25 F] [--config-stacked F]
                          [--plots DIR]

Last stdout line: one JSON object with grid25_modes_min, grid25_hq_mean, ring8_modes_min,
ring8_hq_mean, stacked_modes_mean, stacked_kl_mean, stacked_confident_mean (fractions in
[0, 1]), the per-seed figures, each training's wall time and the published rows (Lin et al.
2018, Tables 1-3).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

STACKED_IMAGES = 25_600  # Stacked-MNIST training images (make-shards' default)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
BENCHMARKS = ("grid25", "ring8", "stacked")
DEFAULT_CONFIGS = {"grid25": "configs/wgan_gp_grid25.yaml", "ring8": "configs/pacgan2_ring8.yaml",
                   "stacked": "configs/dcgan_stacked_mnist.yaml"}
DEFAULT_SEEDS = {"grid25": 5, "ring8": 5, "stacked": 3}
# PacGAN (Lin et al. 2018): modes covered (mean) and high-quality fraction.
PUBLISHED = {
    "grid25": [{"method": "GAN", "modes": 17.3, "high_quality": 0.948},
               {"method": "PacGAN4", "modes": 24.8, "high_quality": 0.936},
               {"method": "VEEGAN", "modes": 24.6, "high_quality": 0.40}],
    "ring8": [{"method": "GAN", "modes": 6.3, "high_quality": 0.982},
              {"method": "PacGAN2", "modes": 7.9, "high_quality": 0.956}],
    # Table 3 (the VEEGAN setup: 128,000 training images): modes covered and KL to uniform.
    "stacked": [{"method": "DCGAN", "modes": 99.0, "kl": 3.40},
                {"method": "VEEGAN", "modes": 150.0, "kl": 2.95},
                {"method": "PacDCGAN2", "modes": 1000.0, "kl": 0.06}],
}


def ganforge(*args: str, threads: int = 1) -> tuple[str, float]:
    """Run one ganforge command (one process); its stdout and wall time in seconds."""
    env = dict(os.environ, WORLD_SIZE="1", OMP_NUM_THREADS=str(threads))
    start = time.monotonic()
    out = subprocess.run([os.path.join(BIN, "ganforge"), *args], check=True, env=env, cwd=REPO,
                         capture_output=True, text=True)
    return out.stdout, time.monotonic() - start


def shards(cache: str, name: str, count: int) -> str:
    """The benchmark's `count` samples as shards in the cache, written on first use."""
    source = ["stacked_mnist"] if name == "stacked" else ["gaussians", "--mixture", name]
    data = os.path.join(cache, f"{source[-1]}-{count}")
    if not os.path.exists(os.path.join(data, "index.json")):
        ganforge("data", "make-shards", "--source", *source, "--n", str(count), "--out", data)
    return data


def train_and_score(name: str, config: str, seed: int, data: str, cache: str, threads: int,
                    plots: str | None) -> tuple[dict, float]:
    """Train `config` at `seed` from scratch and score its EMA generator; (scores, training seconds).

    With `plots`, seed 0's last sample picture (2-D scatter over the mode centres, or an image
    grid) is copied there as modes_<name>.png.
    """
    run = os.path.join(cache, "runs", f"{name}-seed{seed}")
    _, train_s = ganforge("train", "--config", config, f"data.train={data}", f"run.dir={run}", f"seed={seed}",
                          "log.mlflow_uri=none", f"train.threads={threads}", "train.max_minutes=0",
                          "checkpoint.resume=none", threads=threads)
    metric, n = ("stacked", "26000") if name == "stacked" else ("modes", "2500")
    out, _ = ganforge("eval", "--run", run, "--metrics", metric, "--n", n, "--json", threads=threads)
    if plots and seed == 0:
        pictures = sorted(glob.glob(os.path.join(run, "samples", "step_*[0-9].png")))
        os.makedirs(plots, exist_ok=True)
        shutil.copyfile(pictures[-1], os.path.join(plots, f"modes_{name}.png"))
    return json.loads(out.strip().splitlines()[-1]), train_s


def run_stacked(config: str, seeds: int, cache: str, threads: int, plots: str | None) -> dict:
    """Stacked-MNIST: per-seed modes, KL to uniform and confidently read fraction; their means."""
    data = shards(cache, "stacked", STACKED_IMAGES)
    per_seed = []
    for seed in range(seeds):
        scores, train_s = train_and_score("stacked", config, seed, data, cache, threads, plots)
        row = {"seed": seed, "modes_covered": scores["modes_covered"], "kl": round(scores["kl_uniform"], 4),
               "confident": round(scores["high_quality"], 4), "modes_confident": scores["modes_high_quality"],
               "train_s": round(train_s, 1)}
        per_seed.append(row)
        print(f"stacked seed {seed}: {row['modes_covered']}/1000 modes, KL {row['kl']:.3f}, "
              f"{100 * row['confident']:.2f} % read confidently ({row['modes_confident']} modes), "
              f"train {train_s / 60:.1f} min", flush=True)

    def mean(key: str) -> float:
        return round(sum(r[key] for r in per_seed) / len(per_seed), 4)

    print(f"stacked: modes mean {mean('modes_covered'):.1f}, KL mean {mean('kl'):.3f}, "
          f"read confidently {100 * mean('confident'):.2f} %", flush=True)
    return {"stacked_modes_mean": mean("modes_covered"), "stacked_modes_min": min(r["modes_covered"] for r in per_seed),
            "stacked_kl_mean": mean("kl"), "stacked_confident_mean": mean("confident"),
            "stacked_modes_confident_mean": mean("modes_confident"), "stacked_seeds": per_seed,
            "stacked_config": config, "stacked_train_s": [r["train_s"] for r in per_seed],
            "stacked_published": PUBLISHED["stacked"]}


def run_benchmark(name: str, config: str, seeds: int, cache: str, points: int, threads: int,
                  plots: str | None) -> dict:
    """Train and score `config` once per seed; per-seed figures, worst modes, mean high quality."""
    data = shards(cache, name, points)
    per_seed = []
    for seed in range(seeds):
        scores, train_s = train_and_score(name, config, seed, data, cache, threads, plots)
        row = {"seed": seed, "modes_covered": scores["modes_covered"], "modes_total": scores["modes_total"],
               "high_quality": round(scores["high_quality"], 4), "train_s": round(train_s, 1)}
        per_seed.append(row)
        print(f"{name:>7} seed {seed}: {row['modes_covered']}/{row['modes_total']} modes, "
              f"{100 * row['high_quality']:.1f} % high quality, train {train_s / 60:.1f} min", flush=True)
    hq = [r["high_quality"] for r in per_seed]
    modes = [r["modes_covered"] for r in per_seed]
    print(f"{name:>7}: modes min {min(modes)}/{per_seed[0]['modes_total']}, "
          f"high quality mean {100 * sum(hq) / len(hq):.1f} % (min {100 * min(hq):.1f} %)", flush=True)
    return {f"{name}_modes_min": min(modes), f"{name}_modes_total": per_seed[0]["modes_total"],
            f"{name}_hq_mean": round(sum(hq) / len(hq), 4), f"{name}_hq_min": min(hq),
            f"{name}_seeds": per_seed, f"{name}_config": config,
            f"{name}_train_s": [r["train_s"] for r in per_seed], f"{name}_published": PUBLISHED[name]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=BENCHMARKS, help="one benchmark (default: all three)")
    p.add_argument("--seeds", type=int, help="seeds 0..N-1 per benchmark (default 5 for 2-D, 3 for stacked)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process (default 1)")
    for name in BENCHMARKS:
        p.add_argument(f"--config-{name}", default=DEFAULT_CONFIGS[name])
    p.add_argument("--points", type=int, default=100_000, help="points in each mixture")
    p.add_argument("--cache", default=os.path.join(REPO, ".cache", "bench-modes"),
                   help="mixtures (written once) and runs")
    p.add_argument("--plots", help="copy seed 0's last sample picture of each benchmark here (modes_<name>.png)")
    args = p.parse_args()
    result: dict = {"points": args.points, "threads": args.threads}
    start = time.monotonic()
    for name in BENCHMARKS:
        if args.only in (None, name):
            config, seeds = getattr(args, f"config_{name}"), args.seeds or DEFAULT_SEEDS[name]
            if name == "stacked":
                result |= run_stacked(config, seeds, args.cache, args.threads, args.plots)
            else:
                result |= run_benchmark(name, config, seeds, args.cache, args.points, args.threads, args.plots)
    result["wall_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
