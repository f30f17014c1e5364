"""Image-to-image networks: the ResNet and U-Net generators and the PatchGAN discriminator
(CycleGAN, Zhu et al. 2017; pix2pix, Isola et al. 2017), plus the pairs CycleGAN trains together.

Each pair is one module so that one DDP wrapper (one gradient all-reduce) covers both of its
networks, and one optimiser steps them, as in the reference implementation.
"""

from __future__ import annotations

import torch
from torch import nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    """instance (no affine, no running stats: nothing differs across ranks) | batch | none."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm_layer(norm, channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), norm_layer(norm, channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """7x7 conv, two stride-2 downsamplings, `n_blocks` residual blocks, two upsamplings, 7x7 conv, tanh."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 64, n_blocks: int = 9, norm: str = "instance"):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, width, 7),
                                   norm_layer(norm, width), nn.ReLU(True)]
        for i in range(2):
            c = width * 2**i
            layers += [nn.Conv2d(c, 2 * c, 3, 2, 1), norm_layer(norm, 2 * c), nn.ReLU(True)]
        layers += [ResidualBlock(width * 4, norm) for _ in range(n_blocks)]
        for i in range(2):
            c = width * 2 ** (2 - i)
            layers += [nn.ConvTranspose2d(c, c // 2, 3, 2, 1, output_padding=1), norm_layer(norm, c // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class UnetGenerator(nn.Module):
    """Encoder-decoder with skips between mirrored layers, down to 1x1 (`num_downs` = log2 of the side).

    Widths double from `width` to 8x and stay there; the 8x-wide decoder layers after the
    bottleneck use dropout (three of them at 256x256), which is pix2pix's only source of noise.
    """

    def __init__(self, in_channels: int, out_channels: int, num_downs: int, width: int = 64,
                 norm: str = "instance", dropout: bool = True):
        super().__init__()
        widths = [min(width * 2**i, width * 8) for i in range(num_downs)]
        self.down = nn.ModuleList()
        c_in = in_channels
        for i, c in enumerate(widths):
            layers: list[nn.Module] = [] if i == 0 else [nn.LeakyReLU(0.2, True)]
            layers.append(nn.Conv2d(c_in, c, 4, 2, 1, bias=norm != "batch"))
            if 0 < i < num_downs - 1:
                layers.append(norm_layer(norm, c))
            self.down.append(nn.Sequential(*layers))
            c_in = c
        self.up = nn.ModuleList()
        for i in reversed(range(num_downs)):
            c_skip = widths[i] if i < num_downs - 1 else 0  # the innermost layer has no skip to concatenate
            c_out = widths[i - 1] if i > 0 else out_channels
            layers = [nn.ReLU(True), nn.ConvTranspose2d(widths[i] + c_skip, c_out, 4, 2, 1, bias=i == 0 or norm != "batch")]
            if i > 0:
                layers.append(norm_layer(norm, c_out))
                if dropout and 4 <= i < num_downs - 1:  # the 8x-wide layers below the bottleneck
                    layers.append(nn.Dropout(0.5))
            else:
                layers.append(nn.Tanh())
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
        x = self.up[0](skips.pop())
        for layer in self.up[1:]:
            x = layer(torch.cat([x, skips.pop()], 1))
        return x


class PatchDiscriminator(nn.Module):
    """PatchGAN: a grid of real/fake logits, each seeing a 70x70 patch when n_layers=3."""

    def __init__(self, in_channels: int, width: int = 64, n_layers: int = 3, norm: str = "instance"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = width
        for i in range(1, n_layers + 1):
            c_next = width * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_next, 4, stride, 1, bias=norm != "batch"), norm_layer(norm, c_next),
                       nn.LeakyReLU(0.2, True)]
            c = c_next
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CycleGenerators(nn.Module):
    """G_AB and G_BA: one forward gives every image the CycleGAN generator loss needs."""

    def __init__(self, g_ab: nn.Module, g_ba: nn.Module):
        super().__init__()
        self.g_ab, self.g_ba = g_ab, g_ba

    def forward(self, a: torch.Tensor, b: torch.Tensor, identity: bool = True) -> dict[str, torch.Tensor]:
        fake_b, fake_a = self.g_ab(a), self.g_ba(b)
        out = {"fake_b": fake_b, "fake_a": fake_a, "rec_a": self.g_ba(fake_b), "rec_b": self.g_ab(fake_a)}
        if identity:  # each generator should leave images of its target domain unchanged
            out |= {"same_b": self.g_ab(b), "same_a": self.g_ba(a)}
        return out


class CycleDiscriminators(nn.Module):
    """D_A (real vs translated A images) and D_B; one forward scores both domains."""

    def __init__(self, d_a: nn.Module, d_b: nn.Module):
        super().__init__()
        self.d_a, self.d_b = d_a, d_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d_a(a), self.d_b(b)


def build_cyclegan(cfg) -> tuple[nn.Module, nn.Module]:
    """`model.arch=cyclegan`: the generator pair (G_AB, G_BA) and discriminator pair (D_A, D_B)."""
    c = cfg.channels
    g = CycleGenerators(*(ResnetGenerator(c, c, cfg.g_width, cfg.n_blocks, cfg.norm) for _ in range(2)))
    d = CycleDiscriminators(*(PatchDiscriminator(c, cfg.d_width, cfg.d_layers, cfg.d_norm or cfg.norm) for _ in range(2)))
    return reference_init(g, d)


def build_pix2pix(cfg) -> tuple[nn.Module, nn.Module]:
    """`model.arch=pix2pix`: the U-Net and the conditional PatchGAN, which sees (input, output) stacked."""
    c = cfg.channels
    g = UnetGenerator(c, c, cfg.resolution.bit_length() - 1, cfg.g_width, cfg.norm, cfg.dropout)
    d = PatchDiscriminator(2 * c, cfg.d_width, cfg.d_layers, cfg.d_norm or cfg.norm)
    return reference_init(g, d)


def reference_init(g: nn.Module, d: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Weights N(0, 0.02), as in the reference CycleGAN and pix2pix."""
    from trainer.models.dcgan import init_weights

    for m in (g, d):
        m.apply(init_weights)
    return g, d
