"""`ganforge demo`: offline MNIST shards, a 2-process DDP DCGAN run, and where to look afterwards."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import torch

from data_pipeline import DataError, load_index

log = logging.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_mnist_shards(out: str) -> None:
    """Write the MNIST shards once; reuse them when their index is already there."""
    try:
        index = load_index(out)
        log.info("demo: reusing %d MNIST samples in %s", index.num_samples, out)
        return
    except DataError:
        pass
    log.info("demo: writing MNIST shards to %s", out)
    from data_pipeline.progress import bar
    from data_pipeline.sources import mnist_source
    from data_pipeline.writer import write_shards

    src = mnist_source(32)
    write_shards(src.samples, out, kind=src.kind, meta=src.meta, samples_per_shard=1000, force=True,
                 progress=bar, total=src.count)


def accelerate_command(nproc: int, script: str, args: list[str]) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` for all visible GPUs, or `nproc` gloo processes on CPU."""
    env = dict(os.environ)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    if torch.cuda.is_available():
        nproc = nproc or torch.cuda.device_count()
    else:
        nproc = nproc or 2
        env["ACCELERATE_USE_CPU"] = "1"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    if nproc > 1:
        launch += ["--multi_gpu"]
    launch += ["--num_processes", str(nproc), script, *args]
    return launch, env


def run_demo(root: str, minutes: float, nproc: int, overrides: list[str]) -> int:
    data_dir = os.path.join(root, "data", "mnist")
    run_dir = os.path.join(root, "demo")
    ensure_mnist_shards(data_dir)
    args = ["--config", os.path.join(REPO, "configs", "dcgan_mnist.yaml"), f"data.train={data_dir}",
            f"run.dir={run_dir}", "run.name=demo", f"train.max_minutes={minutes}", *overrides]
    cmd, env = accelerate_command(nproc, os.path.join(REPO, "trainer", "main.py"), args)
    shown = " ".join(cmd[2:] if cmd[1] == "-m" else cmd).replace("accelerate.commands.launch", "accelerate launch")
    log.info("demo: %s%s", "ACCELERATE_USE_CPU=1 " if "ACCELERATE_USE_CPU" in env else "", shown)
    code = subprocess.call(cmd, env=env)
    if code != 0:
        print(f"demo: training exited with code {code}", file=sys.stderr)
        return code
    grid = os.path.join(run_dir, "samples", "latest.png")
    db = os.path.join(os.path.abspath(root), "mlflow.db")
    print("\ndemo finished.")
    print(f"  samples:     {grid}")
    print(f"  checkpoints: {os.path.join(run_dir, 'checkpoints')}")
    print(f"  MLflow UI:   mlflow ui --backend-store-uri sqlite:///{db}")
    print(f"  more:        ganforge sample --run {run_dir} --n 64 --seed 1 --out samples.png")
    print(f"  again:       the run resumes from its checkpoint; rm -r {run_dir} to start over")
    if shutil.which("ganforge") is None:
        print("  (activate the environment first: source .venv/bin/activate)")
    return 0
