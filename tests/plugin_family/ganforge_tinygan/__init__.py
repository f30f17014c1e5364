"""`model.arch=tinygan`: a fully connected GAN on images, trained by ganforge's GAN trainer.

The whole plug-in: two networks, a build function, and the Family that ganforge finds through
the `ganforge.families` entry point in pyproject.toml.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import ConfigError
from trainer.families import Family, labelled_images


class Generator(nn.Module):
    """z -> image in [-1, 1]; `labels` is accepted (and ignored) as the GAN trainer passes it."""

    def __init__(self, z_dim: int, width: int, channels: int, side: int):
        super().__init__()
        self.shape = (channels, side, side)
        self.net = nn.Sequential(nn.Linear(z_dim, width), nn.ReLU(), nn.Linear(width, channels * side * side), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(z).view(len(z), *self.shape)


class Discriminator(nn.Module):
    """image -> one logit."""

    def __init__(self, width: int, channels: int, side: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, width), nn.LeakyReLU(0.2),
                                 nn.Linear(width, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x).squeeze(1)


def build(m):
    return (Generator(m.z_dim, m.g_width, m.channels, m.resolution),
            Discriminator(m.d_width, m.channels, m.resolution))


def validate(cfg, world_size: int) -> None:
    if cfg.model.num_classes:
        raise ConfigError("model.num_classes", "tinygan is unconditional; set model.num_classes=0")


FAMILY = Family(trainer="trainer.families.gan:GANTrainer", takes="noise", command="sample", check_data=labelled_images,
                build=build, validate=validate, supports=frozenset({"deepspeed"}), keys=("model.z_dim",))
