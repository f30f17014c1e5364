"""Mode coverage on PacGAN's 2-D benchmarks (grid25, ring8) over several seeds, beside the published rows.

Each benchmark trains its recipe once per seed (one process at a time, `train.threads=1`) on a
100,000-point mixture written once into --cache, then scores the EMA generator with
`ganforge eval --metrics modes --n 2500 --json` (PacGAN protocol: 2,500 samples, a sample is of
high quality within 3 standard deviations of its nearest centre, a mode is covered when it holds
one such sample).

    python bench/modes.py [--only grid25|ring8|stacked] [--seeds N]
                          [--config-ring8 F] [--config-grid25 F]

Last stdout line: one JSON object with grid25_modes_min, grid25_hq_mean, ring8_modes_min,
ring8_hq_mean (fractions in [0, 1]), the per-seed figures, each command's wall time and the
published rows (Lin et al. 2018, Tables 1 and 2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
BENCHMARKS = ("grid25", "ring8")
DEFAULT_CONFIGS = {"grid25": "configs/wgan_gp_grid25.yaml", "ring8": "configs/gan_ring8.yaml"}
# PacGAN (Lin et al. 2018): modes covered (mean) and high-quality fraction.
PUBLISHED = {
    "grid25": [{"method": "GAN", "modes": 17.3, "high_quality": 0.948},
               {"method": "PacGAN4", "modes": 24.8, "high_quality": 0.936},
               {"method": "VEEGAN", "modes": 24.6, "high_quality": 0.40}],
    "ring8": [{"method": "GAN", "modes": 6.3, "high_quality": 0.982},
              {"method": "PacGAN2", "modes": 7.9, "high_quality": 0.956}],
}


def ganforge(*args: str) -> tuple[str, float]:
    """Run one ganforge command (one process); its stdout and wall time in seconds."""
    env = dict(os.environ, WORLD_SIZE="1")
    start = time.monotonic()
    out = subprocess.run([os.path.join(BIN, "ganforge"), *args], check=True, env=env, cwd=REPO,
                         capture_output=True, text=True)
    return out.stdout, time.monotonic() - start


def mixture(cache: str, name: str, points: int) -> str:
    """The mixture's shards in the cache, written on first use."""
    data = os.path.join(cache, f"{name}-{points}")
    if not os.path.exists(os.path.join(data, "index.json")):
        ganforge("data", "make-shards", "--source", "gaussians", "--mixture", name, "--n", str(points),
                 "--out", data)
    return data


def run_benchmark(name: str, config: str, seeds: int, cache: str, points: int) -> dict:
    """Train and score `config` once per seed; per-seed figures, worst modes, mean high quality."""
    data = mixture(cache, name, points)
    per_seed = []
    for seed in range(seeds):
        run = os.path.join(cache, "runs", f"{name}-seed{seed}")
        _, train_s = ganforge("train", "--config", config, f"data.train={data}", f"run.dir={run}",
                              f"seed={seed}", "log.mlflow_uri=none", "train.threads=1", "checkpoint.resume=none")
        out, eval_s = ganforge("eval", "--run", run, "--metrics", "modes", "--n", "2500", "--json")
        scores = json.loads(out.strip().splitlines()[-1])
        row = {"seed": seed, "modes_covered": scores["modes_covered"], "modes_total": scores["modes_total"],
               "high_quality": round(scores["high_quality"], 4), "train_s": round(train_s, 1),
               "eval_s": round(eval_s, 1)}
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
    p.add_argument("--only", choices=[*BENCHMARKS, "stacked"], help="one benchmark (default: grid25 and ring8)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per benchmark (default 5)")
    p.add_argument("--config-ring8", default=DEFAULT_CONFIGS["ring8"])
    p.add_argument("--config-grid25", default=DEFAULT_CONFIGS["grid25"])
    p.add_argument("--points", type=int, default=100_000, help="points in each mixture")
    p.add_argument("--cache", default=os.path.join(REPO, ".cache", "bench-modes"),
                   help="mixtures (written once) and runs")
    args = p.parse_args()
    if args.only == "stacked":
        print("stacked: not yet in bench/modes.py (see bench/stacked_mnist.py)", file=sys.stderr)
        print(json.dumps({"stacked": "not yet"}))
        sys.exit(2)
    configs = {"grid25": args.config_grid25, "ring8": args.config_ring8}
    result: dict = {"seeds": args.seeds, "points": args.points}
    start = time.monotonic()
    for name in BENCHMARKS:
        if args.only in (None, name):
            result |= run_benchmark(name, configs[name], args.seeds, args.cache, args.points)
    result["wall_s"] = round(time.monotonic() - start, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
