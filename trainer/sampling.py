"""Latents, generation and image grids shared by the loop and `ganforge sample`."""

from __future__ import annotations

import os

import torch
from torch import nn


def latents(seed: int, n: int, z_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n latent vectors fixed by `seed` (drawn on CPU, so identical on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, z_dim, generator=g).to(device)


@torch.no_grad()
def generate(g: nn.Module, z: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """G(z) in eval mode, in chunks, as float32 on CPU."""
    was_training = g.training
    g.eval()
    try:
        return torch.cat([g(z[i:i + batch]).float().cpu() for i in range(0, len(z), batch)])
    finally:
        g.train(was_training)


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> str:
    """Save images in [-1, 1] as one PNG grid (atomically)."""
    from torchvision.utils import save_image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    tmp = path + ".tmp.png"
    save_image(images.clamp(-1, 1) * 0.5 + 0.5, tmp, nrow=nrow, padding=2, pad_value=1.0)
    os.replace(tmp, path)
    return path
