"""Architectures, built from the `model` section of the config."""

from __future__ import annotations

from torch import nn

from trainer.config import ModelConfig
from trainer.models.dcgan import DCGANDiscriminator, DCGANGenerator, init_weights
from trainer.models.mlp import MLPDiscriminator, MLPGenerator
from trainer.models.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator
from trainer.models.translation import (
    CycleDiscriminators,
    CycleGenerators,
    PatchDiscriminator,
    ResnetGenerator,
    UnetGenerator,
)

TRANSLATION_ARCHS = ("cyclegan", "pix2pix")


def build_models(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """(generator, discriminator) for `cfg.arch`; spectral norm on D's weights if asked. D takes
    packs of `cfg.pack` samples (trainer/packing.py).

    For CycleGAN both are pairs (G_AB + G_BA, D_A + D_B), each trained as one module.
    """
    if cfg.arch == "dcgan":
        g = DCGANGenerator(cfg.z_dim, cfg.g_width, cfg.channels, cfg.resolution, cfg.norm, cfg.num_classes)
        d = DCGANDiscriminator(cfg.d_width, cfg.channels * cfg.pack, cfg.resolution, cfg.d_norm or cfg.norm,
                               cfg.num_classes)
    elif cfg.arch == "mlp":
        g = MLPGenerator(cfg.z_dim, cfg.g_width, cfg.depth, cfg.channels, cfg.point_scale)
        d = MLPDiscriminator(cfg.d_width, cfg.depth, cfg.channels * cfg.pack, cfg.point_scale)
    elif cfg.arch == "stylegan2":
        g = StyleGAN2Generator(cfg.z_dim, cfg.w_dim, cfg.map_layers, cfg.resolution, cfg.channels,
                               cfg.channel_base, cfg.g_width)
        d = StyleGAN2Discriminator(cfg.resolution, cfg.channels, cfg.channel_base, cfg.d_width, cfg.mbstd_group)
    elif cfg.arch in TRANSLATION_ARCHS:
        g, d = build_translation(cfg)
    elif cfg.arch == "esrgan":
        from trainer.models.esrgan import RRDBNet, UNetDiscriminatorSN, VGGStyleDiscriminator

        g = RRDBNet(cfg.channels, cfg.scale, cfg.g_width, cfg.n_blocks, cfg.growth, cfg.skip)
        d = (UNetDiscriminatorSN(cfg.channels, cfg.d_width) if cfg.d_arch == "unet"
             else VGGStyleDiscriminator(cfg.channels, cfg.d_width, cfg.resolution))
    else:  # a plug-in family (trainer/plugins.py)
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


def build_translation(cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """CycleGAN's generator and discriminator pairs, or pix2pix's U-Net and conditional PatchGAN."""
    c, d_norm = cfg.channels, cfg.d_norm or cfg.norm
    if cfg.arch == "cyclegan":
        g = CycleGenerators(*(ResnetGenerator(c, c, cfg.g_width, cfg.n_blocks, cfg.norm) for _ in range(2)))
        d = CycleDiscriminators(*(PatchDiscriminator(c, cfg.d_width, cfg.d_layers, d_norm) for _ in range(2)))
    else:
        g = UnetGenerator(c, c, cfg.resolution.bit_length() - 1, cfg.g_width, cfg.norm, cfg.dropout)
        d = PatchDiscriminator(2 * c, cfg.d_width, cfg.d_layers, d_norm)  # sees (input, output) stacked
    for m in (g, d):
        m.apply(init_weights)  # N(0, 0.02), as in the reference CycleGAN and pix2pix
    return g, d
