"""DCGAN (Radford et al. 2015): all-convolutional G and D, batch norm, ReLU in G, LeakyReLU in D.

D returns logits (no Sigmoid), so the loss can use the autocast-safe logit forms. With
`num_classes > 0` both are class-conditional: G takes a label embedding beside z, and D adds
the projection term <embed(y), phi(x)> (Miyato & Koyama 2018) to its logit; for a PacGAN pack
of k samples (labels of shape n/k x k), y's embedding is the sum of its members'.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _levels(resolution: int) -> int:
    """Number of 2x up/down-sampling stages between 4x4 and `resolution`."""
    return int(math.log2(resolution)) - 2


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


class DCGANGenerator(nn.Module):
    def __init__(self, z_dim: int = 100, width: int = 64, channels: int = 1, resolution: int = 32,
                 norm: str = "batch", num_classes: int = 0):
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        n = _levels(resolution)
        maps = [width * 2 ** (n - 1 - i) for i in range(n)]  # e.g. 256, 128, 64 for width 64 at 32x32
        z_in = z_dim * 2 if num_classes else z_dim
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_in, maps[0], 4, 1, 0, bias=norm != "batch"),
            _norm(norm, maps[0]), nn.ReLU(True),
        ]
        for c_in, c_out in zip(maps, maps[1:], strict=False):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=norm != "batch"),
                       _norm(norm, c_out), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(maps[-1], channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.net(z.view(z.shape[0], -1, 1, 1))


class DCGANDiscriminator(nn.Module):
    def __init__(self, width: int = 64, channels: int = 1, resolution: int = 32, norm: str = "batch",
                 num_classes: int = 0):
        super().__init__()
        n = _levels(resolution)
        maps = [width * 2 ** i for i in range(n)]  # e.g. 64, 128, 256
        layers: list[nn.Module] = [nn.Conv2d(channels, maps[0], 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(maps, maps[1:], strict=False):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=norm != "batch"),
                       _norm(norm, c_out), nn.LeakyReLU(0.2, True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(maps[-1], 1, 4, 1, 0)
        self.embed = nn.Embedding(num_classes, maps[-1]) if num_classes else None
        self.apply(init_weights)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.features(x)
        out = self.head(h).flatten()
        if self.embed is not None:
            e = self.embed(labels)
            if e.dim() == 3:  # a pack's labels (n/k, k): its members' embeddings, summed
                e = e.sum(dim=1)
            out = out + (e * h.sum(dim=(2, 3))).sum(dim=1)
        return out


def init_weights(m: nn.Module) -> None:
    """The DCGAN paper's init: conv weights N(0, 0.02), BN weights N(1, 0.02), biases 0."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, 0.0, 0.02)


def build(cfg) -> tuple[nn.Module, nn.Module]:
    """`model.arch=dcgan`: (G, D) from the model section; D takes packs of `cfg.pack` images."""
    g = DCGANGenerator(cfg.z_dim, cfg.g_width, cfg.channels, cfg.resolution, cfg.norm, cfg.num_classes)
    d = DCGANDiscriminator(cfg.d_width, cfg.channels * cfg.pack, cfg.resolution, cfg.d_norm or cfg.norm, cfg.num_classes)
    return g, d
