"""Architectures, built from the `model` section of the config."""

from __future__ import annotations

from torch import nn

from trainer.config import ModelConfig
from trainer.models.dcgan import DCGANDiscriminator, DCGANGenerator
from trainer.models.mlp import MLPDiscriminator, MLPGenerator

IMAGE_ARCHS = ("dcgan",)
POINT_ARCHS = ("mlp",)


def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for `cfg.arch`; spectral norm on D's weights if asked."""
    if cfg.arch == "dcgan":
        g = DCGANGenerator(cfg.z_dim, cfg.g_width, cfg.channels, cfg.resolution, cfg.norm, cfg.num_classes)
        d = DCGANDiscriminator(cfg.d_width, cfg.channels, cfg.resolution, cfg.d_norm or cfg.norm, cfg.num_classes)
    elif cfg.arch == "mlp":
        g = MLPGenerator(cfg.z_dim, cfg.g_width, cfg.depth, cfg.channels, cfg.point_scale)
        d = MLPDiscriminator(cfg.d_width, cfg.depth, cfg.channels, cfg.point_scale)
    else:
        raise ValueError(f"unknown model.arch {cfg.arch!r}")
    if cfg.spectral_norm:
        add_spectral_norm(d)
    return g, d


def add_spectral_norm(module: nn.Module) -> None:
    """Spectral normalisation (Miyato et al. 2018) on every conv, linear and embedding weight."""
    for name, child in list(module.named_children()):
        if isinstance(child, (nn.Conv2d, nn.Linear, nn.Embedding)):
            setattr(module, name, nn.utils.parametrizations.spectral_norm(child))
        else:
            add_spectral_norm(child)
