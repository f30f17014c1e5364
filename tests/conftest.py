"""Shared fixtures: small real datasets written with the project's own shard writer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: str = REPO) -> subprocess.CompletedProcess:
    """Run the installed `ganforge` command as a user would."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([os.path.join(BIN, "ganforge"), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def accelerate_cpu(nproc: int, *args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N trainer/main.py ...`."""
    full_env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", **(env or {}))
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if nproc > 1:
        cmd.append("--multi_gpu")
    cmd += ["--num_processes", str(nproc), "trainer/main.py", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    """sklearn's 1,797 digits at 32x32, 256 samples a shard (8 shards, the last one short)."""
    from data_pipeline.sources import digits_source
    from data_pipeline.writer import write_shards

    out = str(tmp_path_factory.mktemp("digits"))
    src = digits_source(32)
    write_shards(src.samples, out, kind=src.kind, meta=src.meta, samples_per_shard=256)
    return out


@pytest.fixture()
def small_dir(tmp_path) -> str:
    """A 60-sample digits dataset in 7 shards of uneven size, private to one test (safe to damage)."""
    from sklearn.datasets import load_digits

    from data_pipeline.sources import _gray_samples
    from data_pipeline.writer import write_shards

    d = load_digits()
    samples = _gray_samples((d.images[:60] * 255 / 16).round(), d.target[:60], 16, "png")
    out = str(tmp_path / "small")
    write_shards(samples, out, kind="image", meta={"size": 16, "channels": 1, "image_ext": "png"},
                 samples_per_shard=9)
    return out


@pytest.fixture(scope="session")
def packaged(tmp_path_factory) -> dict[str, str]:
    """Both packaged datasets at 32x32, built once with the project's own builder."""
    from data_pipeline.packaged import ensure_built

    root = tmp_path_factory.mktemp("packaged")
    ensure_built("sample_images", str(root / "si"), 32)
    ensure_built("edges2photos", str(root / "ep"), 32)
    return {"si": str(root / "si"), "ep": str(root / "ep")}
