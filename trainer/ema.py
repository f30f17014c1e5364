"""Exponential moving average of G's weights with a half-life in images (StyleGAN2-ADA's ema_kimg)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(batch: int, nimg: int, ema_kimg: float, rampup: float) -> float:
    """Decay per step: half-life ema_kimg*1000 images, at most rampup * nimg.

    StyleGAN2-ADA's nimg is the images seen before this step's batch (its cur_nimg, so its first
    update copies G: beta 0); the stylegan2 family passes that, the others the count after it."""
    half_life = ema_kimg * 1000
    if rampup > 0:
        half_life = min(half_life, nimg * rampup)
    return 0.5 ** (batch / max(half_life, 1e-8))


class EMA:
    """Holds the averaged copy of a generator; buffers (e.g. BN statistics) are copied as they are."""

    def __init__(self, g: nn.Module, ema_kimg: float, rampup: float):
        self.model = copy.deepcopy(g).eval().requires_grad_(False)
        self.ema_kimg, self.rampup = ema_kimg, rampup
        self.pairs: tuple | None = None

    @torch.no_grad()
    def update(self, g: nn.Module, batch: int, nimg: int) -> None:
        """Move the average toward `g` by one step of `batch` images; `nimg` sets the ramp-up (see ema_beta)."""
        beta = ema_beta(batch, nimg, self.ema_kimg, self.rampup) if self.ema_kimg > 0 else 0.0
        if self.pairs is None or self.pairs[0] is not g:  # the same generator every step: its tensors found once
            ema, params = list(self.model.parameters()), list(g.parameters())
            if len(ema) != len(params):
                raise ValueError(f"EMA holds {len(ema)} parameters, the generator {len(params)}")
            self.pairs = (g, ema, params, list(self.model.buffers()), list(g.buffers()))
        _, ema, params, ema_buffers, buffers = self.pairs
        torch._foreach_lerp_(ema, params, 1.0 - beta)  # one fused launch per dtype/device, not one per tensor
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)  # likewise
