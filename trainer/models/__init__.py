"""Architectures, built from the `model` section of the config."""

from __future__ import annotations

from torch import nn

from trainer.config import ModelConfig


def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) of the family `cfg.arch` (its Family.build), with spectral norm on
    D's weights if asked. For CycleGAN both are pairs (G_AB + G_BA, D_A + D_B), each trained as one module."""
    from trainer.families import family

    build = family(cfg.arch).build
    if build is None:
        raise ValueError(f"model.arch {cfg.arch!r}: its family gives no build function for its networks")
    g, d = build(cfg)
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
