"""Model families: what each `model.arch` is, in one table.

A family names the trainer that trains it, what its generator takes (latents, or an image it
maps to another), the command that uses a saved generator, what its data must hold, and its
config: its own checks, the optional features it implements, the keys only it reads. The run
loop, `prepare`, `sample`, `translate`, `upscale`, export and MLflow's model logging look the
family up here instead of naming architectures. (The networks are built in trainer/models; the
checks every family shares live in trainer/config, `check_config` runs both.)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from data_pipeline import DataError, load_index
from trainer import config as schema
from trainer.config import Config, ConfigError, ModelConfig
from trainer.plugins import PluginError, discovered

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
    # (generator, discriminator) from the model section (the built-in families' are next to their
    # networks in trainer/models); spectral norm is added by build_models when model.spectral_norm is set
    build: Callable[[ModelConfig], tuple[nn.Module, nn.Module]] | None = None
    # (cfg, world_size) -> None: the family's own config checks, a ConfigError naming the key
    validate: Callable[[Config, int], None] | None = None
    supports: frozenset[str] = frozenset()  # the optional FEATURES it implements: pack, augment, freeze_d, ...
    keys: tuple[str, ...] = ()  # config keys (or "prefix." / "prefix_") that only the families naming them read
    # image families: the side of the images the generator takes (default model.resolution; esrgan: LR side)
    input_side: Callable[[ModelConfig], int] = lambda m: m.resolution

    def make_trainer(self, cfg: Config, env: DistEnv) -> TrainerBase:
        module, name = self.trainer.split(":")
        return getattr(importlib.import_module(module), name)(cfg, env)


def lazy(ref: str) -> Callable[..., Any]:
    """The function "module:name", imported when first called (the table imports no trainer)."""
    def call(*args: Any) -> Any:
        module, name = ref.split(":")
        return getattr(importlib.import_module(module), name)(*args)

    call.__qualname__ = ref
    return call


@dataclass(frozen=True)
class Feature:
    """An option only some families implement: those whose Family.supports names it."""

    key: str  # the config key a refusal names
    used: Callable[[Config], bool]  # whether this run asks for it
    what: str  # how a refusal names it
    fix: str  # what to set instead


FEATURES: dict[str, Feature] = {
    "pack": Feature("model.pack", lambda c: c.model.pack > 1, "packing (PacGAN)", "set model.pack=1"),
    "augment": Feature("train.augment", lambda c: c.train.augment != "none", "adaptive augmentation",
                       "set train.augment=none"),
    "freeze_d": Feature("model.freeze_d", lambda c: c.model.freeze_d > 0, "freezing D blocks", "set model.freeze_d=0"),
    "deepspeed": Feature("strategy", lambda c: c.strategy == "deepspeed", "strategy=deepspeed", "use strategy=ddp"),
    "instance_norm": Feature("model.norm", lambda c: "instance" in (c.model.norm, c.model.d_norm), "instance norm",
                             "set model.norm (and model.d_norm) to batch or none"),
    "ragan": Feature("loss.type", lambda c: c.loss.type == "ragan", "ragan (relativistic average)",
                     "choose another loss.type"),
}

GAN = "trainer.families.gan:GANTrainer"
STYLEGAN2_KEYS = ("model.w_dim", "model.map_layers", "model.style_mixing", "model.channel_base", "model.mbstd_group",
                  "model.freeze_d", "loss.pl_", "train.augment", "train.augment_p", "train.ada_")
ESRGAN_KEYS = ("degrade.", "model.scale", "model.growth", "model.d_arch", "model.skip", "loss.pixel_weight",
               "loss.gan_weight", "loss.perceptual_", "train.pretrain_steps")
FAMILIES: dict[str, Family] = {
    "dcgan": Family(GAN, "noise", "sample", labelled_images, build=lazy("trainer.models.dcgan:build"),
                    validate=lazy("trainer.families.gan:check_dcgan"),
                    supports=frozenset({"pack", "deepspeed"}), keys=("model.z_dim", "model.pack")),
    "mlp": Family(GAN, "noise", "sample", points, build=lazy("trainer.models.mlp:build"), supports=frozenset({"pack", "deepspeed"}),
                  keys=("model.z_dim", "model.pack", "model.depth", "model.point_scale")),
    "stylegan2": Family("trainer.families.stylegan2:StyleGAN2Trainer", "noise", "sample", labelled_images,
                        build=lazy("trainer.models.stylegan2:build"),
                        validate=lazy("trainer.families.stylegan2:check_stylegan2"),
                        supports=frozenset({"augment", "freeze_d"}), keys=("model.z_dim", *STYLEGAN2_KEYS)),
    "cyclegan": Family("trainer.families.cyclegan:CycleGANTrainer", "image", "translate", two_domains,
                       build=lazy("trainer.models.translation:build_cyclegan"),
                       validate=lazy("trainer.families.cyclegan:check_cyclegan"),
                       supports=frozenset({"instance_norm"}),
                       keys=("model.n_blocks", "model.d_layers", "data.train_b", "data.val_b", "loss.cycle_weight",
                             "loss.identity_weight", "train.pool_size")),
    "pix2pix": Family("trainer.families.pix2pix:Pix2PixTrainer", "image", "translate", pairs,
                      build=lazy("trainer.models.translation:build_pix2pix"),
                      validate=lazy("trainer.families.pix2pix:check_pix2pix"),
                      supports=frozenset({"instance_norm"}),
                      keys=("model.d_layers", "model.dropout", "model.direction", "loss.l1_weight")),
    "esrgan": Family("trainer.families.esrgan:ESRGANTrainer", "image", "upscale", crops,
                     build=lazy("trainer.models.esrgan:build"),
                     input_side=lambda m: m.resolution // m.scale,
                     validate=lazy("trainer.families.esrgan:check_esrgan"), supports=frozenset({"ragan"}),
                     keys=("model.n_blocks", *ESRGAN_KEYS)),
}


def family(arch: str) -> Family:
    """The built-in family `arch`, else the plug-in of that name (trainer/plugins.py)."""
    found = FAMILIES.get(arch) or discovered().get(arch)
    if found is None:
        raise ConfigError("model.arch", f"unknown architecture {arch!r} (choose from "
                                        f"{', '.join([*FAMILIES, *discovered()])})")
    return found


def every_family() -> dict[str, Family]:
    """The built-in families and the plug-ins; a broken plug-in is a ConfigError on model.arch."""
    try:
        return {**FAMILIES, **discovered()}
    except PluginError as e:
        raise ConfigError("model.arch", str(e)) from None


def check_config(cfg: Config, world_size: int = 1) -> None:
    """Every check of a run's config, naming the key at fault: the model family exists, implements
    the optional features the run asks for, and accepts its section; and config's own `validate`
    (bounds, choices, and the rules every family shares). Changes nothing, reads no environment."""
    families = every_family()
    chosen = family(cfg.model.arch)
    for name, feature in FEATURES.items():
        if feature.used(cfg) and name not in chosen.supports:
            which = ", ".join(arch for arch, f in families.items() if name in f.supports) or "no family"
            raise ConfigError(feature.key, f"{feature.what} is implemented for {which}, not {cfg.model.arch}; "
                                           f"{feature.fix}")
    schema.validate(cfg, world_size)
    if chosen.validate:
        params = inspect.signature(chosen.validate).parameters.values()
        takes_world_size = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
        # validate(cfg) is the plug-in API this version kept from the last: both are called
        chosen.validate(*(cfg, world_size) if takes_world_size else (cfg,))


def load_config(path: str | list[str] | None, overrides: list[str] = (), world_size: int = 1) -> Config:
    """trainer.config.load_config with every check (`check_config`): what a run, `config show`,
    `launch` and `k8s render` use."""
    return schema.load_config(path, overrides, world_size, check=check_config)


def applicable_params(cfg: Config) -> dict[str, Any]:
    """The run's flat config less the keys it does not use: those only other families read (their
    Family.keys), and those config.APPLIES_WHEN rules out for its loss and strategy."""
    mine = family(cfg.model.arch).keys
    owned = {key for f in every_family().values() for key in f.keys}

    def named(key: str, names: Any) -> bool:
        return any(key == n or (n.endswith((".", "_")) and key.startswith(n)) for n in names)

    return schema.applicable_params(cfg, lambda key: not named(key, owned) or named(key, mine))


def require_command(arch: str, command: str, where: str) -> None:
    """A saved generator used by the wrong command: one line naming the right one."""
    from trainer.checkpoint import CheckpointError

    right = family(arch).command
    if right != command:
        raise CheckpointError(f"{where}: a {arch} run is used with `ganforge {right}`, not `ganforge {command}`")
