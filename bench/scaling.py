"""Data-parallel scaling on this machine: images/s of 1 process vs N DDP processes (gloo on CPU).

Both train configs/dcgan_digits.yaml with the same global batch; throughput is read from the
runs' metrics.jsonl (perf/images_per_s, averaged over the log points after the first, so
start-up is excluded). On a CPU the processes share the cores, so the ratio shows the cost of
DDP's communication more than a speed-up; on a multi-GPU machine it is the scaling efficiency.

Last stdout line: JSON with images/s for 1 and N processes and ratio = N-process / 1-process.
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


def throughput(run_dir: str) -> float:
    rates = [rec["perf/images_per_s"] for rec in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl")))
             if "perf/images_per_s" in rec]
    return sum(rates[1:]) / len(rates[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dcgan_digits.yaml")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    from bench.workspace import digits_workspace

    _, data = digits_workspace(args.config, "scaling")
    work = tempfile.mkdtemp(prefix="ganforge-bench-scaling-runs-")
    common = ["--config", args.config, f"data.train={data}", f"train.max_steps={args.steps}",
              f"log.every_steps={args.steps // 6}", "log.mlflow_uri=none", f"checkpoint.every_steps={args.steps}"]
    cores = os.cpu_count() or 1
    env = dict(os.environ, OMP_NUM_THREADS=str(cores), WORLD_SIZE="1")
    subprocess.run([os.path.join(BIN, "ganforge"), "train", *common, f"run.dir={work}/one"],
                   check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(max(1, cores // args.nproc)))
    env.pop("WORLD_SIZE", None)
    subprocess.run([os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
                    "--dynamo_backend", "no", "--multi_gpu", "--num_processes", str(args.nproc), "trainer/main.py",
                    *common, f"run.dir={work}/many"], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    one, many = throughput(f"{work}/one"), throughput(f"{work}/many")
    print(f"1 process: {one:.0f} img/s, {args.nproc} processes: {many:.0f} img/s")
    print(json.dumps({"config": args.config, "nproc": args.nproc, "cores": cores, "img_s_1": round(one, 1),
                      f"img_s_{args.nproc}": round(many, 1), "ratio": round(many / one, 3)}))


if __name__ == "__main__":
    main()
