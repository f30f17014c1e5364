"""The hand-written DCGAN loops ganforge's step is measured against, on the CPU (bench/overhead.py)
and on a GPU (bench/gpu.py): one builder, so that both benchmarks time the same loops.

- `tight=False`: pytorch/examples dcgan/main.py's loop as users write it (with logits): D's real
  and fake terms backpropagated one after the other, and D's weight gradients computed (and,
  under DDP, all-reduced) in the G step too.
- `tight=True`: the tightest loop doing the recipe's work: one D backward over the real and fake
  terms, the D step's fake reused, D frozen (and, under DDP, unwrapped) in the G step so that only
  G's gradients are computed and reduced, no buffer broadcasts, gradients set to None, Adam in
  its fused form as ganforge uses it, and the recipe's EMA of G (trainer.ema: one fused lerp and
  one fused buffer copy).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F


def dcgan_step(cfg, images: Callable[[], torch.Tensor], device: torch.device, *, tight: bool, ddp: bool = False,
               autocast: torch.dtype | None = None, channels_last: bool = False,
               compile_mode: str | None = None) -> Callable[[], None]:
    """One step of the loop as a function, from the recipe's seed-0 networks on `device`; `images()`
    gives the next uint8 batch (this rank's part of it under `ddp`). For the tight loop: autocast
    in `autocast`'s dtype, channels_last weights and inputs, and G and D compiled in
    `compile_mode` (None: eager)."""
    from torch.nn.parallel import DistributedDataParallel

    from trainer.config import CUDA_GRAPH_MODES
    from trainer.core import compile_network
    from trainer.ema import EMA
    from trainer.models import build_models

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g, d = (m.to(device, memory_format=fmt) for m in build_models(cfg.model))
    if compile_mode:
        compile_network(g, compile_mode)
        compile_network(d, compile_mode)
    g_plain, d_plain = g, d
    if ddp:  # tight: each rank keeps its own BN statistics, no buffer traffic at all
        ids = [device.index] if device.type == "cuda" else None
        g, d = (DistributedDataParallel(m, device_ids=ids, broadcast_buffers=not tight) for m in (g, d))
    betas = (cfg.train.beta1, cfg.train.beta2)
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=lr, betas=betas, fused=tight or None)
                    for m, lr in ((g, cfg.train.lr_g), (d, cfg.train.lr_d)))
    bce, z_dim = F.binary_cross_entropy_with_logits, cfg.model.z_dim
    graphs = compile_mode in CUDA_GRAPH_MODES and device.type == "cuda"

    def real_batch() -> torch.Tensor:
        if graphs:  # a new CUDA-graph iteration, as torch's docs ask of a training loop (and ganforge does)
            torch.compiler.cudagraph_mark_step_begin()
        real = images().to(device, non_blocking=True).float() / 127.5 - 1
        return real.contiguous(memory_format=fmt) if channels_last else real

    if not tight:
        def examples() -> None:
            real = real_batch()
            n = real.shape[0]
            d.zero_grad()
            bce(d(real), torch.ones(n, device=device)).backward()
            fake = g(torch.randn(n, z_dim, device=device))
            bce(d(fake.detach()), torch.zeros(n, device=device)).backward()
            opt_d.step()
            g.zero_grad()
            bce(d(fake), torch.ones(n, device=device)).backward()
            opt_g.step()

        return examples

    ema, batch, nimg = EMA(g_plain, cfg.train.ema_kimg, cfg.train.ema_rampup), cfg.train.batch_size, [0]
    mixed = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else contextlib.nullcontext
    wide = (lambda x: x.float()) if autocast else (lambda x: x)  # losses in float32, as ganforge's
    targets: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # (ones, zeros) by batch size, made once

    def step() -> None:
        real = real_batch()
        n = real.shape[0]
        if n not in targets:
            targets[n] = (torch.ones(n, device=device), torch.zeros(n, device=device))
        ones, zeros = targets[n]
        z = torch.randn(n, z_dim, device=device)
        opt_d.zero_grad(set_to_none=True)
        with mixed():
            fake = g(z)
            loss_d = bce(wide(d(real)), ones) + bce(wide(d(fake.detach())), zeros)
        loss_d.backward()
        opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        d_plain.requires_grad_(False)
        with mixed():
            loss_g = bce(wide(d_plain(fake)), ones)
        loss_g.backward()
        d_plain.requires_grad_(True)
        opt_g.step()
        nimg[0] += batch
        ema.update(g_plain, batch, nimg[0])

    return step
