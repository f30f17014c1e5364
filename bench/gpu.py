"""GPU throughput of DCGAN 64x64: the ganforge step in fp32 and in bf16 + channels_last (+ compile),
against a bare pytorch/examples-style fp32 loop on the same GPU, in one run.

All variants train configs/dcgan64.yaml's models (full DCGAN widths) on the same random
in-memory uint8 batches, so only the step differs. Reports images/s, step time and peak GPU
memory per variant. Needs a CUDA device; `--allow-cpu` runs the same code on the CPU for a
smoke test (the figures then mean nothing for GPUs).

Last stdout line: JSON with each variant and ratio = best ganforge variant / bare fp32 loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def timed(step, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, peak memory in bytes) of `step` after warm-up."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return (time.perf_counter() - t0) / steps, peak


def bare_step_fn(cfg, batch: torch.Tensor, device: torch.device):
    from trainer.models import build_models

    torch.manual_seed(0)
    g, d = (m.to(device) for m in build_models(cfg.model))
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.train.lr_d, betas=(cfg.train.beta1, cfg.train.beta2))
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.train.lr_g, betas=(cfg.train.beta1, cfg.train.beta2))
    b = batch.shape[0]
    ones, zeros = torch.ones(b, device=device), torch.zeros(b, device=device)

    def step() -> None:
        real = batch.to(device, non_blocking=True).float() / 127.5 - 1
        d.zero_grad()
        F.binary_cross_entropy_with_logits(d(real), ones).backward()
        fake = g(torch.randn(b, cfg.model.z_dim, device=device))
        F.binary_cross_entropy_with_logits(d(fake.detach()), zeros).backward()
        opt_d.step()
        g.zero_grad()
        F.binary_cross_entropy_with_logits(d(fake), ones).backward()
        opt_g.step()

    return step


def ganforge_step_fn(cfg, batch: torch.Tensor, device: torch.device):
    from trainer.data import DataCursor
    from trainer.distributed import DistEnv
    from trainer.loop import Trainer

    labels = torch.zeros(batch.shape[0], dtype=torch.int64)
    DataCursor.next = lambda self: {"image": batch.to(device, non_blocking=True), "label": labels.to(device)}
    trainer = Trainer(cfg, DistEnv(0, 1, 0, device))
    return trainer.train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU (smoke test only)")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("bench/gpu.py: no CUDA device here; run it on a GPU machine (or --allow-cpu for a smoke test)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from bench.workspace import digits_workspace

    base = ["model.resolution=64", "model.channels=3", "log.mlflow_uri=none", f"train.batch_size={args.batch}"]
    make_cfg = lambda *extra: digits_workspace("configs/dcgan64.yaml", "gpu", *base, *extra)[0]  # noqa: E731
    batch = torch.randint(0, 256, (args.batch, 3, 64, 64), dtype=torch.uint8)
    if device.type == "cuda":
        batch = batch.pin_memory()
    variants = {
        "bare_fp32": lambda: bare_step_fn(make_cfg(), batch, device),
        "ganforge_fp32": lambda: ganforge_step_fn(make_cfg("precision=fp32", "train.channels_last=false"), batch, device),
        "ganforge_bf16_cl": lambda: ganforge_step_fn(make_cfg("precision=bf16"), batch, device),
    }
    if not args.no_compile:
        variants["ganforge_bf16_cl_compile"] = lambda: ganforge_step_fn(
            make_cfg("precision=bf16", "train.compile=true"), batch, device)
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "batch": args.batch, "steps": args.steps}
    for name, make in variants.items():
        seconds, peak = timed(make(), args.steps, args.warmup, device)
        result[name] = {"img_s": round(args.batch / seconds, 1), "step_ms": round(seconds * 1000, 2),
                        "peak_mem_mb": round(peak / 2**20, 1)}
        print(f"{name:>26}: {result[name]}", flush=True)
    best = max(v["img_s"] for k, v in result.items() if k.startswith("ganforge"))
    result["ratio"] = round(best / result["bare_fp32"]["img_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
