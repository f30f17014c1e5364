"""Typed run configuration: YAML recipes plus dotted `key=value` overrides.

Every field is declared here with its default, its meaning, and what it may hold: a fixed set of
values as a `Literal[...]` annotation, numeric bounds as `bounded(...)` field metadata. Loading
checks names and types; `validate` checks every declared choice and bound, and the combinations
that cannot work whatever the model, raising ConfigError naming the key. A model family checks
its own section (trainer/families: `check_config` runs both), so nothing here names one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(Exception):
    """A bad configuration; `key` is the dotted name at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config error: {key}: {message}")
        self.key = key


def bounded(default: float, *, ge: float | None = None, gt: float | None = None, le: float | None = None) -> Any:
    """A numeric field's default and the bounds `validate` holds it to (ge: >=, gt: >, le: <=)."""
    return field(default=default, metadata={"bounds": (ge, gt, le)})


@dataclass
class RunConfig:
    name: str = "run"  # identity in MLflow and the launcher's rendezvous id
    dir: str = ""  # holds config.yaml, checkpoints/, samples/; default runs/<name>


@dataclass
class DataConfig:
    train: str = ""  # a make-shards directory (or URL prefix holding index.json)
    train_b: str = ""  # second domain for unpaired translation
    val: str = ""  # held-out shards (translation: measured and pictured at each sample step)
    val_b: str = ""  # held-out shards of the second domain (CycleGAN)
    build: Literal["", "sample_images", "edges2photos", "sr_photos"] = ""  # sample_images | edges2photos | sr_photos: build the packaged dataset holding data.train if missing
    num_workers: int = bounded(0, ge=0)  # DataLoader workers per rank
    on_error: Literal["raise", "skip"] = "raise"  # raise | skip (a bad sample is counted and replaced)
    max_skip_fraction: float = bounded(0.01, ge=0, le=1)  # on_error=skip: stop (DataError) once more than this fraction of samples was bad
    flip: bool = False  # random horizontal flips, fixed by (seed, epoch, sample)
    pad: bool = True  # pad the epoch so every rank reads the same count (else drop the tail)
    shuffle_block_shards: int = bounded(0, ge=0)  # 0: shuffle all samples; k: shuffle within blocks of k shards
    partition_nodes: int = bounded(0, ge=0)  # > 1: split each epoch's shards among this many node streams (set it to the node count)
    cache_dir: str = ""  # node-local cache for http(s):// and s3:// shards, shared by the node's ranks and workers
    cache_limit: int = bounded(0, ge=0)  # bytes of shards no reader needs that the cache keeps (0: no limit)
    prefetch_shards: int = bounded(2, ge=0)  # with data.cache_dir: shards each loader worker downloads ahead of reading


@dataclass
class ModelConfig:
    arch: str = "dcgan"  # a family of trainer/families (dcgan, stylegan2, mlp, cyclegan, pix2pix, esrgan) or a plug-in
    resolution: int = 32  # image side; a power of two >= 16 (stylegan2: >= 8; ignored by mlp; esrgan: the HR crop side)
    channels: int = bounded(1, gt=0)  # image channels, or the point dimension for mlp
    z_dim: int = bounded(100, gt=0)  # latent size (the generator's input)
    g_width: int = bounded(64, gt=0)  # dcgan: maps of G's last hidden layer (doubling towards 4x4); mlp: hidden units
    d_width: int = bounded(64, gt=0)  # dcgan: maps of D's first layer (doubling towards 4x4); mlp: hidden units
    depth: int = 4  # mlp hidden layers
    point_scale: float = bounded(1.0, gt=0)  # mlp: the data's scale (std); G and D work at unit scale inside
    norm: Literal["batch", "instance", "none"] = "batch"  # normalisation in G's (and, unless d_norm is set, D's) hidden layers
    d_norm: Literal["", "batch", "instance", "none"] = ""  # for D; empty: same as norm
    spectral_norm: bool = False  # spectral normalisation of D's weights (SNGAN)
    num_classes: int = bounded(0, ge=0)  # > 0: class-conditional G and projection D, trained on the data's labels
    pack: int = bounded(1, ge=1)  # PacGAN: D judges this many samples jointly (images along channels, points along features); dcgan, mlp
    n_blocks: int = bounded(9, ge=0)  # cyclegan: residual blocks of the ResNet generators; esrgan: RRDB blocks (23 in ESRGAN)
    d_layers: int = bounded(3, ge=1)  # PatchGAN strided layers (3: 70x70 patches)
    dropout: bool = True  # pix2pix: dropout in the U-Net decoder
    direction: Literal["AtoB", "BtoA"] = "AtoB"  # pix2pix: AtoB translates member a into b; BtoA the reverse
    sync_bn: bool = False  # BN over the global batch (SyncBatchNorm on GPU, all-reduces on CPU); default: BN statistics averaged after each step
    w_dim: int = bounded(512, gt=0)  # stylegan2: size of the intermediate latent w
    map_layers: int = bounded(8, gt=0)  # stylegan2: fully connected layers of the mapping network z -> w
    style_mixing: float = bounded(0.9, ge=0, le=1)  # stylegan2: probability that a training sample mixes two w's
    channel_base: int = bounded(16384, gt=0)  # stylegan2: feature maps at resolution r are channel_base / r, at most g_width / d_width
    mbstd_group: int = bounded(4, ge=0)  # stylegan2: minibatch-std group size in D; 0 = no minibatch-std layer
    freeze_d: int = bounded(0, ge=0)  # stylegan2: keep D's first N blocks (fromRGB with the highest-resolution block first) fixed, for transfer
    scale: Literal[2, 4] = 4  # esrgan: upscaling factor (the LR input is resolution / scale)
    growth: int = bounded(32, gt=0)  # esrgan: growth channels of the RRDB dense blocks (g_width: the features)
    skip: Literal["none", "bicubic"] = "none"  # esrgan: none (ESRGAN) | bicubic (G adds the bicubic upscaling of its input: it learns the residual)
    d_arch: Literal["vgg", "unet"] = "vgg"  # esrgan: vgg (ESRGAN's VGG-style D, batch norm) | unet (Real-ESRGAN's U-Net D, spectral norm)


@dataclass
class LossConfig:
    type: Literal["bce", "hinge", "wgan", "wgan_gp", "lsgan", "ragan"] = "bce"  # ragan: relativistic average (esrgan)
    gp_weight: float = 10.0  # wgan_gp penalty weight (lambda)
    clip: float = 0.01  # wgan weight clipping bound
    r1_gamma: float = bounded(0.0, ge=0)  # R1 penalty gamma/2 * E||grad D(x_real)||^2; 0 disables
    r1_every: int = bounded(16, gt=0)  # lazy R1: every k D steps, scaled by k (StyleGAN2)
    cycle_weight: float = 10.0  # cyclegan: weight of the cycle-consistency L1 (lambda)
    identity_weight: float = 0.5  # cyclegan: identity L1 weight, as a fraction of cycle_weight
    l1_weight: float = 100.0  # pix2pix: weight of the L1 distance to the target
    pl_weight: float = bounded(2.0, ge=0)  # stylegan2: path-length regularisation weight; 0 disables
    pl_every: int = bounded(4, gt=0)  # stylegan2: lazy path-length regularisation every k steps, scaled by k
    pl_decay: float = bounded(0.01, gt=0, le=1)  # stylegan2: decay of the running mean path length
    pl_batch_shrink: int = bounded(2, gt=0)  # stylegan2: the path-length step uses batch_size / this samples
    pixel_weight: float = bounded(1.0, ge=0)  # esrgan: weight of the L1 distance to the HR image (the only term before train.pretrain_steps)
    gan_weight: float = bounded(0.1, ge=0)  # esrgan: weight of the adversarial term (Real-ESRGAN 0.1, ESRGAN 0.005)
    perceptual_weight: float = bounded(1.0, ge=0)  # esrgan: weight of the VGG19 perceptual term, when loss.perceptual_weights is set
    perceptual_weights: str = ""  # esrgan: a local torchvision VGG19 state dict (nothing is downloaded); empty: no perceptual term


@dataclass
class TrainConfig:
    batch_size: int = bounded(64, gt=0)  # GLOBAL batch; each rank takes batch_size / world_size
    max_steps: int = bounded(1000, gt=0)  # G steps
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    n_critic: int = bounded(1, gt=0)  # D steps per G step
    optimizer: Literal["adam", "rmsprop"] = "adam"  # adam | rmsprop (the WGAN paper's choice with weight clipping)
    lr_g: float = bounded(2e-4, gt=0)  # generator learning rate
    lr_d: float = bounded(2e-4, gt=0)  # discriminator learning rate
    beta1: float = 0.5  # Adam's beta1 (momentum) for both networks
    beta2: float = 0.999  # Adam's beta2 for both networks
    lr_decay_start: float = bounded(1.0, ge=0, le=1)  # fraction of max_steps after which both lrs decay linearly to 0 (1.0: constant)
    accumulate: int = bounded(1, gt=0)  # micro-batches per phase step (gradient accumulation)
    grad_clip: float = 0.0  # clip each network's gradient norm to this; 0 = off
    max_nonfinite: int = bounded(20, gt=0)  # abort after this many consecutive steps with a non-finite loss or gradient
    compile: bool = False  # torch.compile G and D (not with a penalty on gradients: wgan_gp, R1, path length)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"  # torch.compile's mode with train.compile; reduce-overhead and max-autotune are meant to replay CUDA graphs on a GPU (one process)
    channels_last: bool = True  # channels_last memory format for conv nets on GPU
    deterministic: bool = False  # deterministic kernels only (bitwise-repeatable GPU runs; slower)
    ema_kimg: float = 10.0  # half-life of G's EMA in thousands of images; 0 disables EMA
    ema_rampup: float = 0.05  # EMA half-life is at most this fraction of images seen
    threads: int = 0  # torch threads per process; 0 = leave as launched
    pool_size: int = bounded(50, ge=0)  # cyclegan: generated images each rank keeps to show D (0: none)
    augment: Literal["none", "ada"] = "none"  # stylegan2: ada (adaptive discriminator augmentation) | none
    augment_p: float = bounded(0.0, ge=0, le=1)  # stylegan2: initial augmentation probability
    ada_target: float = bounded(0.6, ge=0, le=1)  # ADA: target for r_t = E[sign(D(real))] (averaged over all ranks)
    ada_interval: int = bounded(4, gt=0)  # ADA: adjust p every k steps
    ada_kimg: float = bounded(500.0, gt=0)  # ADA: p can move from 0 to 1 in this many thousand images
    pretrain_steps: int = bounded(0, ge=0)  # esrgan: the first k steps train G on the L1 term alone (the PSNR stage), then the GAN stage


@dataclass
class DegradeConfig:
    """esrgan: how each training pair's LR image is made from its HR crop (data_pipeline/degrade.py), drawn
    from (seed, epoch, sample) so that it does not depend on the world size and resumes exactly."""

    blur: float = bounded(0.0, ge=0, le=1)  # probability of a Gaussian blur (random sigmas and angle) before the bicubic downsampling
    blur_sigma: float = bounded(3.0, ge=0.2)  # largest blur sigma in HR pixels (the smallest is 0.2)
    noise: float = bounded(0.0, ge=0, le=1)  # probability of Gaussian noise after the downsampling
    noise_sigma: float = bounded(25.0, ge=1)  # largest noise sigma on the 0..255 scale (the smallest is 1)
    jpeg: float = bounded(0.0, ge=0, le=1)  # probability of JPEG re-encoding at the end
    jpeg_quality: int = bounded(30, ge=1, le=95)  # lowest JPEG quality (the highest is 95)


@dataclass
class DeepSpeedConfig:
    """strategy=deepspeed: ZeRO data parallelism, one DeepSpeed engine per network (docs/deepspeed.md)."""

    zero_stage: int = 2  # 1: partition optimiser state over ranks; 2: also gradients (3 is refused)
    bucket_size: int = bounded(200_000_000, gt=0)  # elements per gradient reduce / parameter all-gather bucket (at most about the network's size)
    overlap_comm: bool = False  # stage 2: overlap the gradient reduction with the backward pass (GPU)


@dataclass
class CheckpointConfig:
    every_steps: int = bounded(500, gt=0)  # save a checkpoint every k steps (and at the end and on SIGTERM)
    keep: int = bounded(3, gt=0)  # newest checkpoints kept
    milestone_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
    resume: str = "latest"  # latest | none | PATH
    init_from: str = ""  # a fresh run starts from this run dir's (or checkpoint's) network weights: new optimisers, step 0


@dataclass
class LogConfig:
    mlflow_uri: str = ""  # default sqlite:///<parent of run.dir>/mlflow.db; "none" disables
    experiment: str = "ganforge"  # MLflow experiment name
    prometheus_port: int = bounded(0, ge=0, le=65535)  # 0 disables the /metrics exporter
    every_steps: int = bounded(50, gt=0)  # progress line, metrics.jsonl, MLflow and /metrics losses every k steps
    sample_every_steps: int = bounded(500, gt=0)  # sample grids of the fixed latents every k steps
    sample_count: int = 64  # images in each sample grid
    register_model: str = ""  # register the final EMA generator under this MLflow model name; empty: not registered
    model_every_steps: int = 0  # also log the EMA generator as an MLflow model every k steps (at checkpoints); 0: only at the end


@dataclass
class EvalConfig:
    every_steps: int = bounded(0, ge=0)  # evaluate the EMA generator every k steps during training; 0 = never
    metrics: str = "fid"  # comma-separated: fid, kid, pr, modes, classes, stacked
    n: int = bounded(5000, ge=4)  # generated samples per evaluation
    features: Literal["auto", "inception", "digits", "points", "stacked"] = "auto"  # auto | inception | digits | points | stacked
    inception_weights: str = ""  # local Inception-v3 FID weights file (nothing is downloaded)
    cache_dir: str = ""  # real-data statistics and classifier cache; default <parent of run.dir>/eval_cache


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 0  # the one seed everything derives from (weights, data order, latents)
    data: DataConfig = field(default_factory=DataConfig)
    degrade: DegradeConfig = field(default_factory=DegradeConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: Literal["auto", "fp32", "bf16", "fp16", "fp64"] = "auto"  # auto (accelerate's --mixed_precision, else bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | fp64 (for equivalence checks; slow)
    strategy: Literal["ddp", "deepspeed"] = "ddp"  # ddp | deepspeed
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def declared(cls: type | None = None, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) for every leaf field of the config, in declaration order."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from declared(typ, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, typ


CHOICES = {key: typing.get_args(typ) for key, _, typ in declared() if typing.get_origin(typ) is Literal}
EVAL_METRICS = ("fid", "kid", "pr", "modes", "classes", "stacked", "psnr", "ssim")  # what eval.metrics may name


def check_declared(cfg: Config) -> None:
    """Every value is finite, one of its field's `Literal` choices and within its `bounded` limits."""
    flat = to_flat(cfg)
    for key, f, _ in declared():
        value = flat[key]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number; got {value}")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(key, f"must be one of {', '.join(map(str, CHOICES[key]))}; got {value!r}")
        ge, gt, le = f.metadata.get("bounds", (None, None, None))
        low_ok = (ge is None or value >= ge) and (gt is None or value > gt)
        if not (low_ok and (le is None or value <= le)):
            low = f"{ge}.." if ge is not None else f"({gt}, " if gt is not None else ""
            limit = (f"in {low}{le}" + ("]" if gt is not None else "") if le is not None
                     else f">= {ge}" if ge is not None else f"> {gt}")
            raise ConfigError(key, f"must be {limit}; got {value}")


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if value is None:
            return ""
    raise ConfigError(key, f"expected {typ.__name__}, got {value!r}")


def _set(node: Any, path: list[str], value: Any, prefix: str = "") -> None:
    name = path[0]
    key = f"{prefix}{name}"
    fields = {f.name: f for f in dataclasses.fields(node)}
    if name not in fields:
        raise ConfigError(key, f"unknown key (known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(type(node))
    typ = hints[name]
    if dataclasses.is_dataclass(typ):
        if len(path) > 1:
            _set(getattr(node, name), path[1:], value, key + ".")
        elif isinstance(value, dict):
            for k, v in value.items():
                _set(getattr(node, name), [str(k)], v, key + ".")
        else:
            raise ConfigError(key, f"is a section; set {key}.<field> or give a mapping, got {value!r}")
        return
    if isinstance(typ, types.UnionType):
        typ = next(t for t in typ.__args__ if t is not type(None))
    if typing.get_origin(typ) is Literal:  # coerced to the choices' type; `validate` checks the choice
        typ = type(typing.get_args(typ)[0])
    if len(path) > 1:
        raise ConfigError(f"{key}.{path[1]}", f"{key} is a {typ.__name__}, not a section")
    setattr(node, name, _coerce(key, value, typ))


def apply(cfg: Config, values: dict[str, Any]) -> Config:
    """Apply a nested mapping (as read from YAML) onto `cfg`."""
    if not isinstance(values, dict):
        raise ConfigError("<root>", f"expected a mapping at the top of the file, got {type(values).__name__}")
    for k, v in values.items():
        _set(cfg, [str(k)], v)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(text, "override must look like dotted.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | list[str] | None, overrides: list[str] = (), world_size: int = 1,
                check: Callable[[Config, int], None] | None = None) -> Config:
    """Config from YAML file(s) (or defaults) plus dotted overrides, resolved, then checked by
    `check` (default: `validate`; trainer.families.load_config passes the full check, the model
    family's included). With several files, each is applied over the ones before it, then the
    overrides."""
    cfg = Config()
    for one in [path] if isinstance(path, str) else path or []:
        try:
            with open(one) as f:
                doc = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError("--config", f"no such file {one}") from None
        except yaml.YAMLError as e:
            raise ConfigError("--config", f"{one} is not valid YAML ({str(e).splitlines()[0]})") from None
        apply(cfg, doc)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key.split("."), value)
    resolve(cfg)
    (check or validate)(cfg, world_size)
    return cfg


def resolve(cfg: Config) -> Config:
    """Fill in the defaults that derive from other keys: run.dir is runs/<run.name> unless set."""
    if not cfg.run.dir:
        cfg.run.dir = os.path.join("runs", cfg.run.name)
    return cfg


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that replay CUDA graphs


def second_derivatives(cfg: Config) -> str | None:
    """What in `cfg`'s objective differentiates a network's gradient (None: nothing; a family's own
    penalties, such as StyleGAN2's path length, are its check's)."""
    loss = cfg.loss
    if loss.type == "wgan_gp":
        return "wgan_gp's gradient penalty"
    if loss.r1_gamma > 0:
        return f"the R1 penalty (loss.r1_gamma={loss.r1_gamma:g})"
    return None


def refuse_compile_with(penalty: str) -> ConfigError:
    """The error for train.compile with a `penalty` that differentiates a gradient."""
    return ConfigError("train.compile", f"{penalty} differentiates D's or G's gradient, and torch.compile'd "
                                        f"networks have no second derivative; set train.compile=false")


def check_compile(cfg: Config, world_size: int) -> None:
    """train.compile_mode takes effect with train.compile, and its CUDA-graph modes in one-process jobs
    only; train.compile not with a penalty on gradients (torch.compile'd networks have no second
    derivative: their backward cannot be differentiated again)."""
    train = cfg.train
    mode = train.compile_mode
    if mode != "default" and not train.compile:
        raise ConfigError("train.compile_mode", f"{mode} takes effect with train.compile=true")
    if train.compile and mode in CUDA_GRAPH_MODES and world_size > 1:
        raise ConfigError("train.compile_mode", f"{mode} replays CUDA graphs, which ganforge runs in one-process jobs "
                                                f"only; with {world_size} processes use default or max-autotune-no-cudagraphs")
    penalty = second_derivatives(cfg) if train.compile else None
    if penalty:
        raise refuse_compile_with(penalty)


def validate(cfg: Config, world_size: int = 1) -> None:
    """Reject impossible values and combinations that hold for every model family, naming the key.
    Reads `cfg` only: nothing is changed and no environment variable is read (the caller knows the
    world size). A family's own rules are trainer.families.check_config's."""
    check_declared(cfg)
    if not cfg.data.train:
        raise ConfigError("data.train", "required: a directory written by `ganforge data make-shards`")
    if cfg.checkpoint.init_from and cfg.strategy == "deepspeed":
        raise ConfigError("checkpoint.init_from", "not supported with strategy=deepspeed yet (its optimiser "
                                                  "keeps its own copy of the weights); fine-tune with ddp")
    every, ckpt = cfg.log.model_every_steps, cfg.checkpoint.every_steps
    if every < 0 or every % ckpt:
        raise ConfigError("log.model_every_steps", f"must be 0 (at the end only) or a multiple of "
                                                   f"checkpoint.every_steps={ckpt}; got {every}")
    validate_eval(cfg)
    if cfg.train.batch_size % world_size:
        raise ConfigError("train.batch_size", f"global batch {cfg.train.batch_size} is not divisible "
                                              f"by the world size {world_size}")
    if (cfg.train.batch_size // world_size) % cfg.train.accumulate:
        raise ConfigError("train.accumulate", f"per-rank batch {cfg.train.batch_size // world_size} is not "
                                              f"divisible into {cfg.train.accumulate} micro-batches")
    micro, k = cfg.train.batch_size // world_size // cfg.train.accumulate, cfg.model.pack
    if micro % k:
        raise ConfigError("model.pack", f"the per-rank batch of {micro} samples (train.batch_size / world size / "
                                        f"train.accumulate) is not divisible into packs of {k}")
    if cfg.loss.type == "wgan" and cfg.loss.clip <= 0:
        raise ConfigError("loss.clip", f"wgan needs a positive clipping bound; got {cfg.loss.clip}")
    if cfg.precision == "fp64" and cfg.eval.every_steps:
        raise ConfigError("eval.every_steps", "evaluation runs in float32: with precision=fp64 (for equivalence "
                                              "checks) evaluate the checkpoints afterwards with `ganforge eval`")
    if cfg.strategy == "deepspeed":
        validate_deepspeed(cfg)  # first: it refuses train.compile whatever the objective
    check_compile(cfg, world_size)


def validate_eval(cfg: Config) -> None:
    """eval.*: caught here, not at the first evaluation hours into the run."""
    e = cfg.eval
    names = [m.strip() for m in e.metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in EVAL_METRICS]
    if unknown or not names:
        raise ConfigError("eval.metrics", f"{e.metrics!r}: choose from {', '.join(EVAL_METRICS)}")
    if e.every_steps and e.inception_weights and not os.path.isfile(e.inception_weights):
        raise ConfigError("eval.inception_weights", f"no such file {e.inception_weights!r}")


def validate_deepspeed(cfg: Config) -> None:
    """What strategy=deepspeed supports: ZeRO stage 1 or 2 (the families it trains are the family table's)."""
    stage = cfg.deepspeed.zero_stage
    if stage == 3:
        raise ConfigError("deepspeed.zero_stage", "3 is not supported: ZeRO-3 shards the weights, and ganforge's "
                                                  "EMA, sampling and weight clipping need whole parameters on every rank (use 1 or 2)")
    if stage not in (1, 2):
        raise ConfigError("deepspeed.zero_stage", f"must be 1 or 2 (0 is plain data parallelism: strategy=ddp); got {stage}")
    if cfg.precision == "fp64":
        raise ConfigError("precision", "fp64 (for equivalence checks) runs with strategy=ddp; deepspeed trains in fp32, bf16 or fp16")
    if cfg.train.compile:
        raise ConfigError("train.compile", "torch.compile is not supported with strategy=deepspeed")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("strategy", "deepspeed is not installed in this environment "
                                      "(make install, or pip install -c constraints.txt deepspeed)")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_flat(cfg: Config) -> dict[str, Any]:
    """{"train.batch_size": 64, ...}: the form used for overrides and MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out


# Which run a key means something to, where a key other than model.arch decides: key (or
# "prefix.") -> (the key that decides, its values). The keys only some model families read are
# the family table's (Family.keys); trainer.families.applicable_params adds those.
APPLIES_WHEN: dict[str, tuple[str, tuple[str, ...]]] = {
    "deepspeed.": ("strategy", ("deepspeed",)),
    "loss.gp_weight": ("loss.type", ("wgan_gp",)),
    "loss.clip": ("loss.type", ("wgan",)),
}


def applicable_params(cfg: Config, applies: Callable[[str], bool] = lambda key: True) -> dict[str, Any]:
    """to_flat(cfg) less the keys APPLIES_WHEN rules out for this run's loss and strategy, and those
    `applies` rules out (trainer.families.applicable_params: the keys of other families)."""
    flat = to_flat(cfg)

    def ruled_in(key: str) -> bool:
        for name, (decider, values) in APPLIES_WHEN.items():
            if key == name or (name.endswith((".", "_")) and key.startswith(name)):
                return flat[decider] in values
        return True

    return {k: v for k, v in flat.items() if ruled_in(k) and applies(k)}


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved with to_dict (e.g. inside a checkpoint)."""
    return apply(Config(), values)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
