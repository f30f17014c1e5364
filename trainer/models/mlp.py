"""MLP generator and discriminator for low-dimensional data (the 2-D Gaussian mixtures)."""

from __future__ import annotations

import torch
from torch import nn


def _mlp(d_in: int, width: int, depth: int, d_out: int, act: nn.Module) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), act]
    layers.append(nn.Linear(width if depth else d_in, d_out))
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """z -> point; the net works at unit scale and `scale` maps its output to the data's scale."""

    def __init__(self, z_dim: int = 2, width: int = 256, depth: int = 4, out_dim: int = 2, scale: float = 1.0):
        super().__init__()
        self.z_dim = z_dim
        self.net = _mlp(z_dim, width, depth, out_dim, nn.ReLU(True))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z) * self.scale


class MLPDiscriminator(nn.Module):
    """point -> logit; inputs are divided by `scale` first, so the critic sees unit-scale data."""

    def __init__(self, width: int = 256, depth: int = 4, in_dim: int = 2, scale: float = 1.0):
        super().__init__()
        self.net = _mlp(in_dim, width, depth, 1, nn.LeakyReLU(0.2, True))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x / self.scale).flatten()


def build(cfg) -> tuple[nn.Module, nn.Module]:
    """`model.arch=mlp`: (G, D) for points; D takes packs of `cfg.pack` points."""
    g = MLPGenerator(cfg.z_dim, cfg.g_width, cfg.depth, cfg.channels, cfg.point_scale)
    d = MLPDiscriminator(cfg.d_width, cfg.depth, cfg.channels * cfg.pack, cfg.point_scale)
    return g, d
