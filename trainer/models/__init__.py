"""Architectures, built from the `model` section of the config."""

from __future__ import annotations

from torch import nn

from trainer.config import ModelConfig
from trainer.models.dcgan import DCGANDiscriminator, DCGANGenerator


def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for `cfg.arch`."""
    if cfg.arch == "dcgan":
        g = DCGANGenerator(cfg.z_dim, cfg.g_width, cfg.channels, cfg.resolution, cfg.norm)
        d = DCGANDiscriminator(cfg.d_width, cfg.channels, cfg.resolution, cfg.norm)
        return g, d
    raise ValueError(f"unknown model.arch {cfg.arch!r}")
