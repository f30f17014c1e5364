"""A 2-process DDP run is the same computation as a 1-process run with the same global batch.

In float64 (`precision=fp64`) summation-order noise is ~1e-16, so the two runs agree to 1e-9
relative in every weight tensor of G and D and in every logged statistic at every step,
gradient norms included (Adam's update hides a wrong gradient scale; the norms show it). In
float32 the same noise reaches ~1e-7, and Adam turns it into sign noise on elements whose true
gradient is zero (a bias before a normalisation), so those checks can only be made in float64.
"""

from __future__ import annotations

import json
import os
import time
from itertools import pairwise

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import accelerate_cpu, run_cli
from trainer.checkpoint import list_checkpoints, read_checkpoint
from trainer.config import from_dict
from trainer.models import build_models

TOLERANCE = 1e-9  # relative; measured at most 1.2e-13 (each test prints its largest differences under -s)
FLOOR = 1e-12  # absolute, for tensors and statistics that are (near) zero
NOT_COMPUTED = ("perf/",)  # wall-clock figures
# lr x steps x sqrt(numel) x (round-off / Adam's eps) with round-off <= 1e-13 is ~5e-8 for the
# tests' cancelled biases; float32 round-off would make them drift by ~lr = 1e-4.
ROUND_OFF_DRIFT = 1e-6
NORMALISATIONS = (nn.BatchNorm2d, nn.InstanceNorm2d, nn.SyncBatchNorm)
TINY_DCGAN = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16"]
COMMON = ["precision=fp64", "log.every_steps=1", "log.mlflow_uri=none", "train.threads=1"]


def train_both(tmp_path, recipe: str, *overrides: str) -> tuple[str, str]:
    """Run `recipe` with 2 processes and with 1 (same seed, same global batch); their run dirs."""
    args = ["--config", recipe, *COMMON, *overrides]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    r = accelerate_cpu(2, *args, f"run.dir={two}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", *args, f"run.dir={one}", env={"WORLD_SIZE": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return two, one


def difference(a: torch.Tensor | float, b: torch.Tensor | float) -> tuple[float, float]:
    """(|a - b|, |b|), as norms for tensors."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm()), float(b.norm())


def cancelled_biases(config: dict) -> set[str]:
    """Biases of layers followed directly by a per-channel normalisation (e.g. CycleGAN's convs before
    InstanceNorm): the normalisation subtracts them again, so they change no output and their true
    gradient is exactly zero. Their gradient is round-off (~1e-17), which Adam divides by its eps
    (1e-8): they drift by round-off in both runs, differently, and are no part of the computation."""
    g, d = build_models(from_dict(config).model)
    found = set()
    for net, module in (("G", g), ("D", d), ("G_ema", g)):
        for name, seq in module.named_modules():
            layers = list(seq.named_children()) if isinstance(seq, nn.Sequential) else []
            for (key, layer), (_, after) in pairwise(layers):
                if getattr(layer, "bias", None) is not None and isinstance(after, NORMALISATIONS):
                    found.add(f"{net}.{name}.{key}.bias")
    return found


def weight_differences(two: str, one: str) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """Differences of every tensor of G, D (and G's EMA) in the last checkpoints of the two runs:
    those that matter, and (apart) those of the cancelled biases."""
    a, b = (read_checkpoint(list_checkpoints(run)[0][1]) for run in (two, one))
    assert (a["world_size"], b["world_size"], a["step"]) == (2, 1, b["step"])
    cancelled = cancelled_biases(b["config"])
    out, drift = {}, {}
    for net in ("G", "D", "G_ema") if "G_ema" in b else ("G", "D"):
        assert a[net].keys() == b[net].keys()
        for k, v in b[net].items():
            assert a[net][k].dtype == v.dtype and (v.dtype == torch.float64 or not v.is_floating_point()), f"{net}.{k}"
            if f"{net}.{k}" in cancelled:
                drift[f"{net}.{k}"] = difference(a[net][k], v)[0]
            else:
                out[f"{net}.{k}"] = difference(a[net][k], v)
    return out, drift


def statistic_differences(two: str, one: str) -> dict[str, tuple[float, float]]:
    """Difference of every logged value at every logged step (rank 0's metrics.jsonl)."""
    logs = [[json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] for run in (two, one)]
    assert len(logs[0]) == len(logs[1]) > 1
    out = {}
    for a, b in zip(*logs, strict=True):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for k in b:
            if not k.startswith(NOT_COMPUTED):
                out[f"step {b['step']} {k}"] = difference(a[k], b[k])
    return out


def assert_equal_runs(two: str, one: str, must_log: tuple[str, ...]) -> dict[str, float]:
    """Every weight and every statistic within TOLERANCE; returns the largest relative differences."""
    (weights, drift), stats = weight_differences(two, one), statistic_differences(two, one)
    logged = {k.split(" ", 2)[2] for k in stats}
    assert set(must_log) <= logged, f"not logged: {set(must_log) - logged}"
    for name, (diff, norm) in {**weights, **stats}.items():
        assert diff <= TOLERANCE * norm + FLOOR, f"{name}: differs by {diff:.3g} (relative {diff / max(norm, 1e-300):.3g})"
    for name, diff in drift.items():
        assert diff <= ROUND_OFF_DRIFT, f"{name} (cancelled by a normalisation): differs by {diff:.3g}"

    def worst(found: dict[str, tuple[float, float]]) -> float:
        return max((diff / norm if norm else 0.0) for diff, norm in found.values())

    figures = {"weights": worst(weights), "grad_norm": worst({k: v for k, v in stats.items() if "grad_norm/" in k}),
               "statistics": worst(stats)}
    print("max relative difference:", {k: f"{v:.2g}" for k, v in figures.items()},
          f"{len(drift)} cancelled biases: max {max(drift.values(), default=0.0):.2g} absolute")
    return figures


@pytest.mark.slow
def test_float64_dcgan_with_batch_norm_two_processes_equal_one(digits_dir, tmp_path):
    """DCGAN with batch norm in G and D, with model.sync_bn=true: batch statistics over the global
    batch (on CPU through trainer.sync_batchnorm's all-reduces). Without it each rank normalises
    over its own half of the batch, a different function by construction (measured: losses 2-9 %
    and D's gradient norm 3.5 % apart from the first steps)."""
    started = time.perf_counter()
    two, one = train_both(tmp_path, "configs/dcgan_digits.yaml", f"data.train={digits_dir}", *TINY_DCGAN,
                          "model.sync_bn=true", "train.max_steps=3")
    assert_equal_runs(two, one, ("loss/d", "loss/g", "d/real", "d/fake", "grad_norm/d", "grad_norm/g"))
    print(f"wall {time.perf_counter() - started:.1f} s")


@pytest.mark.slow
def test_float64_wgan_gp_two_processes_equal_one(digits_dir, tmp_path):
    """WGAN-GP (5 critic steps, penalty interpolation drawn for the global batch), no batch norm."""
    started = time.perf_counter()
    two, one = train_both(tmp_path, "configs/wgan_gp_digits.yaml", f"data.train={digits_dir}", *TINY_DCGAN,
                          "train.max_steps=2")
    assert_equal_runs(two, one, ("loss/d", "loss/gp", "loss/g", "grad_norm/d", "grad_norm/g"))
    print(f"wall {time.perf_counter() - started:.1f} s")
    # An fp64 run's checkpoint samples like any other (loading casts it to the float32 network).
    r = run_cli("sample", "--run", two, "--n", "8", "--seed", "0", "--out", f"{two}.npy", "--no-ema")
    assert r.returncode == 0, r.stderr[-2000:]
    x = np.load(f"{two}.npy")
    assert x.dtype == np.float32 and x.shape == (8, 1, 32, 32) and np.isfinite(x).all() and x.std() > 0


@pytest.mark.slow
def test_float64_stylegan2_two_processes_equal_one(digits_dir, tmp_path):
    """StyleGAN2 with every phase active within 3 steps: path length (steps 0, 2), R1 (steps 0, 2),
    ADA augmenting from p = 0.2 and adjusting p every 2 steps, style mixing, minibatch std (its
    groups, samples i, i + N/G, ..., are the same under the rank interleave)."""
    started = time.perf_counter()
    two, one = train_both(
        tmp_path, "configs/stylegan2_digits.yaml", f"data.train={digits_dir}", "model.g_width=16", "model.d_width=16",
        "model.channel_base=256", "model.z_dim=32", "model.w_dim=32", "train.batch_size=8", "loss.r1_every=2",
        "loss.pl_every=2", "train.augment_p=0.2", "train.ada_interval=2", "train.ada_kimg=1", "train.max_steps=3")
    assert_equal_runs(two, one, ("loss/g", "loss/pl", "loss/pl_mean", "loss/d", "loss/r1", "augment/p", "augment/rt",
                                 "grad_norm/g", "grad_norm/g_reg", "grad_norm/d", "grad_norm/d_reg"))
    print(f"wall {time.perf_counter() - started:.1f} s")


@pytest.fixture(scope="module")
def textures(tmp_path_factory) -> str:
    """The packaged grass / gravel textures at 32x32 (CycleGAN's CPU recipe's data)."""
    from data_pipeline.packaged import ensure_built

    root = tmp_path_factory.mktemp("textures")
    ensure_built("sample_images", str(root), 32)
    return str(root)


@pytest.mark.slow
def test_float64_cyclegan_two_processes_equal_one(textures, tmp_path):
    """CycleGAN with the identity term and held-out figures. train.pool_size=0: the image pool is
    per rank by design (as the reference's per-GPU pool), its coin flips drawn from (seed, step,
    rank), so with a pool a 2-process run shows D other history than a 1-process run."""
    started = time.perf_counter()
    two, one = train_both(
        tmp_path, "configs/cyclegan_sample_images.yaml", "data.build=", f"data.train={textures}/trainA",
        f"data.train_b={textures}/trainB", f"data.val={textures}/testA", f"data.val_b={textures}/testB",
        "model.resolution=32", "model.g_width=8", "model.d_width=8", "model.n_blocks=1", "model.d_layers=2",
        "loss.identity_weight=0.5", "train.pool_size=0", "train.batch_size=4", "train.max_steps=3",
        "log.sample_every_steps=3")
    assert_equal_runs(two, one, ("loss/g", "loss/cycle", "loss/identity", "loss/d", "grad_norm/g", "grad_norm/d"))
    print(f"wall {time.perf_counter() - started:.1f} s")
