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
    def __init__(self, z_dim: int = 2, width: int = 256, depth: int = 4, out_dim: int = 2):
        super().__init__()
        self.z_dim = z_dim
        self.net = _mlp(z_dim, width, depth, out_dim, nn.ReLU(True))

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z)


class MLPDiscriminator(nn.Module):
    def __init__(self, width: int = 256, depth: int = 4, in_dim: int = 2):
        super().__init__()
        self.net = _mlp(in_dim, width, depth, 1, nn.LeakyReLU(0.2, True))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x).flatten()
