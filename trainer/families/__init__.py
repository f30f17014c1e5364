"""Model families: what each `model.arch` is, in one table.

A family names the trainer that trains it, what its generator takes (latents, or an image it
maps to another), the command that uses a saved generator, and what its data must hold. The
run loop, `prepare`, `sample`, `translate`, `upscale`, export and MLflow's model logging look
the family up here instead of naming architectures. (The networks are built in
trainer/models, the config's own checks live in trainer/config.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from data_pipeline import DataError, load_index
from trainer.config import Config, ConfigError, ModelConfig
from trainer.plugins import discovered

if TYPE_CHECKING:
    from data_pipeline.index import ShardIndex
    from trainer.core import TrainerBase
    from trainer.distributed import DistEnv


def check_images(cfg: Config, key: str, index: ShardIndex, kind: str, at_least: bool = False) -> None:
    """The shards at config `key` hold `kind` samples of the model's size (or, `at_least`, one a crop of
    that size fits in) and channel count."""
    where = index.root
    if index.kind != kind:
        raise ConfigError(key, f"{where} holds {index.kind} samples; {cfg.model.arch} needs {kind} samples")
    size, channels = index.meta.get("size"), index.meta.get("channels")
    if size is not None and (size < cfg.model.resolution if at_least else size != cfg.model.resolution):
        crops = "crops of " if at_least else ""
        raise ConfigError("model.resolution", f"{crops}{cfg.model.resolution}, but {where} has {size}x{size} images")
    if channels is not None and channels != cfg.model.channels:
        raise ConfigError("model.channels", f"{cfg.model.channels}, but {where} has {channels}-channel images")


def check_more_images(cfg: Config, keys: list[str], kind: str) -> None:
    """check_images for the other datasets a family reads (held-out, second domain), those set."""
    for key in keys:
        location = getattr(cfg.data, key.split(".")[1])
        if not location:
            continue
        try:
            check_images(cfg, key, load_index(location), kind)
        except DataError as e:
            raise ConfigError(key, str(e)) from None


def labelled_images(cfg: Config, index: ShardIndex) -> None:
    """GAN families: images of the model's size; labels enough for a conditional model."""
    check_images(cfg, "data.train", index, "image")
    classes = len(index.meta.get("label_names") or [])
    if cfg.model.num_classes and not classes:
        raise ConfigError("model.num_classes", f"{cfg.data.train} has no labels for a conditional model")
    if cfg.model.num_classes and classes > cfg.model.num_classes:
        raise ConfigError("model.num_classes", f"{cfg.model.num_classes}, but {cfg.data.train} has {classes} classes")


def points(cfg: Config, index: ShardIndex) -> None:
    """The MLP family: points of the model's dimension."""
    if index.kind != "points":
        raise ConfigError("model.arch", f"{cfg.model.arch} models 2-D points; {cfg.data.train} holds {index.kind} samples")
    dims = index.meta.get("dims", 2)
    if dims != cfg.model.channels:
        raise ConfigError("model.channels", f"{cfg.model.channels}, but {cfg.data.train} has {dims}-D points")


def two_domains(cfg: Config, index: ShardIndex) -> None:
    """CycleGAN: two image domains, and held-out images of both."""
    check_images(cfg, "data.train", index, "image")
    check_more_images(cfg, ["data.val", "data.train_b", "data.val_b"], "image")


def pairs(cfg: Config, index: ShardIndex) -> None:
    """pix2pix: paired shards, and held-out pairs."""
    check_images(cfg, "data.train", index, "paired")
    check_more_images(cfg, ["data.val"], "paired")


def crops(cfg: Config, index: ShardIndex) -> None:
    """Super-resolution: HR images a crop fits in; held-out HR images of exactly the crop size."""
    check_images(cfg, "data.train", index, "image", at_least=True)
    check_more_images(cfg, ["data.val"], "image")


@dataclass(frozen=True)
class Family:
    trainer: str  # "module:Class", imported when a run starts (the CLI stays light)
    takes: str  # what the generator takes: "noise" (latents) or "image" (it maps one image to another)
    command: str  # the command that uses a saved generator: sample | translate | upscale
    check_data: Callable[[Config, ShardIndex], None]  # what data.train (and the other datasets) must hold
    # (generator, discriminator) from the model section; the built-in families' are in trainer/models
    build: Callable[[ModelConfig], tuple[nn.Module, nn.Module]] | None = None
    validate: Callable[[Config], None] | None = None  # a plug-in's own config checks (ConfigError naming the key)

    def make_trainer(self, cfg: Config, env: DistEnv) -> TrainerBase:
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(module), name)(cfg, env)


GAN = "trainer.families.gan:GANTrainer"
FAMILIES: dict[str, Family] = {
    "dcgan": Family(GAN, "noise", "sample", labelled_images),
    "mlp": Family(GAN, "noise", "sample", points),
    "stylegan2": Family("trainer.families.stylegan2:StyleGAN2Trainer", "noise", "sample", labelled_images),
    "cyclegan": Family("trainer.families.image_to_image:TranslationTrainer", "image", "translate", two_domains),
    "pix2pix": Family("trainer.families.image_to_image:TranslationTrainer", "image", "translate", pairs),
    "esrgan": Family("trainer.families.esrgan:ESRGANTrainer", "image", "upscale", crops),
}


def family(arch: str) -> Family:
    """The built-in family `arch`, else the plug-in of that name (trainer/plugins.py)."""
    found = FAMILIES.get(arch) or discovered().get(arch)
    if found is None:
        raise ConfigError("model.arch", f"unknown architecture {arch!r} (choose from "
                                        f"{', '.join([*FAMILIES, *discovered()])})")
    return found


def require_command(arch: str, command: str, where: str) -> None:
    """A saved generator used by the wrong command: one line naming the right one."""
    from trainer.checkpoint import CheckpointError

    right = family(arch).command
    if right != command:
        raise CheckpointError(f"{where}: a {arch} run is used with `ganforge {right}`, not `ganforge {command}`")
