"""Typed run configuration: YAML recipes plus dotted `key=value` overrides.

Every field is declared here with its default and meaning. Loading checks names and types
and the combinations that cannot work, and raises ConfigError naming the key, before any
process group starts.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from trainer.plugins import PluginError, discovered


class ConfigError(Exception):
    """A bad configuration; `key` is the dotted name at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config error: {key}: {message}")
        self.key = key


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
    build: str = ""  # sample_images | edges2photos | sr_photos: build the packaged dataset holding data.train if missing
    num_workers: int = 0  # DataLoader workers per rank
    on_error: str = "raise"  # raise | skip (a bad sample is counted and replaced)
    max_skip_fraction: float = 0.01  # on_error=skip: stop (DataError) once more than this fraction of samples was bad
    flip: bool = False  # random horizontal flips, fixed by (seed, epoch, sample)
    pad: bool = True  # pad the epoch so every rank reads the same count (else drop the tail)
    shuffle_block_shards: int = 0  # 0: shuffle all samples; k: shuffle within blocks of k shards
    partition_nodes: int = 0  # > 1: split each epoch's shards among this many node streams (set it to the node count)
    cache_dir: str = ""  # node-local cache for http(s):// and s3:// shards, shared by the node's ranks and workers
    cache_limit: int = 0  # bytes of shards no reader needs that the cache keeps (0: no limit)
    prefetch_shards: int = 2  # with data.cache_dir: shards each loader worker downloads ahead of reading


@dataclass
class ModelConfig:
    arch: str = "dcgan"  # dcgan | stylegan2 (images) | mlp (2-D points) | cyclegan | pix2pix (image-to-image) | esrgan (super-resolution)
    resolution: int = 32  # image side; a power of two >= 16 (stylegan2: >= 8; ignored by mlp; esrgan: the HR crop side)
    channels: int = 1  # image channels, or the point dimension for mlp
    z_dim: int = 100  # latent size (the generator's input)
    g_width: int = 64  # dcgan: maps of G's last hidden layer (doubling towards 4x4); mlp: hidden units
    d_width: int = 64  # dcgan: maps of D's first layer (doubling towards 4x4); mlp: hidden units
    depth: int = 4  # mlp hidden layers
    point_scale: float = 1.0  # mlp: the data's scale (std); G and D work at unit scale inside
    norm: str = "batch"  # batch | instance | none: normalisation in G's (and, unless d_norm is set, D's) hidden layers
    d_norm: str = ""  # batch | none for D; empty: same as norm
    spectral_norm: bool = False  # spectral normalisation of D's weights (SNGAN)
    num_classes: int = 0  # > 0: class-conditional G and projection D, trained on the data's labels
    pack: int = 1  # PacGAN: D judges this many samples jointly (images along channels, points along features); dcgan, mlp
    n_blocks: int = 9  # cyclegan: residual blocks of the ResNet generators; esrgan: RRDB blocks (23 in ESRGAN)
    d_layers: int = 3  # PatchGAN strided layers (3: 70x70 patches)
    dropout: bool = True  # pix2pix: dropout in the U-Net decoder
    direction: str = "AtoB"  # pix2pix: AtoB translates member a into b; BtoA the reverse
    sync_bn: bool = False  # BN over the global batch (SyncBatchNorm on GPU, all-reduces on CPU); default: BN statistics averaged after each step
    w_dim: int = 512  # stylegan2: size of the intermediate latent w
    map_layers: int = 8  # stylegan2: fully connected layers of the mapping network z -> w
    style_mixing: float = 0.9  # stylegan2: probability that a training sample mixes two w's
    channel_base: int = 16384  # stylegan2: feature maps at resolution r are channel_base / r, at most g_width / d_width
    mbstd_group: int = 4  # stylegan2: minibatch-std group size in D; 0 = no minibatch-std layer
    freeze_d: int = 0  # stylegan2: keep D's first N blocks (fromRGB with the highest-resolution block first) fixed, for transfer
    scale: int = 4  # esrgan: upscaling factor, 2 or 4 (the LR input is resolution / scale)
    growth: int = 32  # esrgan: growth channels of the RRDB dense blocks (g_width: the features)
    skip: str = "none"  # esrgan: none (ESRGAN) | bicubic (G adds the bicubic upscaling of its input: it learns the residual)
    d_arch: str = "vgg"  # esrgan: vgg (ESRGAN's VGG-style D, batch norm) | unet (Real-ESRGAN's U-Net D, spectral norm)


@dataclass
class LossConfig:
    type: str = "bce"  # bce | hinge | wgan | wgan_gp | lsgan | ragan (relativistic average, esrgan)
    gp_weight: float = 10.0  # wgan_gp penalty weight (lambda)
    clip: float = 0.01  # wgan weight clipping bound
    r1_gamma: float = 0.0  # R1 penalty gamma/2 * E||grad D(x_real)||^2; 0 disables
    r1_every: int = 16  # lazy R1: every k D steps, scaled by k (StyleGAN2)
    cycle_weight: float = 10.0  # cyclegan: weight of the cycle-consistency L1 (lambda)
    identity_weight: float = 0.5  # cyclegan: identity L1 weight, as a fraction of cycle_weight
    l1_weight: float = 100.0  # pix2pix: weight of the L1 distance to the target
    pl_weight: float = 2.0  # stylegan2: path-length regularisation weight; 0 disables
    pl_every: int = 4  # stylegan2: lazy path-length regularisation every k steps, scaled by k
    pl_decay: float = 0.01  # stylegan2: decay of the running mean path length
    pl_batch_shrink: int = 2  # stylegan2: the path-length step uses batch_size / this samples
    pixel_weight: float = 1.0  # esrgan: weight of the L1 distance to the HR image (the only term before train.pretrain_steps)
    gan_weight: float = 0.1  # esrgan: weight of the adversarial term (Real-ESRGAN 0.1, ESRGAN 0.005)
    perceptual_weight: float = 1.0  # esrgan: weight of the VGG19 perceptual term, when loss.perceptual_weights is set
    perceptual_weights: str = ""  # esrgan: a local torchvision VGG19 state dict (nothing is downloaded); empty: no perceptual term


@dataclass
class TrainConfig:
    batch_size: int = 64  # GLOBAL batch; each rank takes batch_size / world_size
    max_steps: int = 1000  # G steps
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall time; 0 = no limit
    n_critic: int = 1  # D steps per G step
    optimizer: str = "adam"  # adam | rmsprop (the WGAN paper's choice with weight clipping)
    lr_g: float = 2e-4  # generator learning rate
    lr_d: float = 2e-4  # discriminator learning rate
    beta1: float = 0.5  # Adam's beta1 (momentum) for both networks
    beta2: float = 0.999  # Adam's beta2 for both networks
    lr_decay_start: float = 1.0  # fraction of max_steps after which both lrs decay linearly to 0 (1.0: constant)
    accumulate: int = 1  # micro-batches per phase step (gradient accumulation)
    grad_clip: float = 0.0  # clip each network's gradient norm to this; 0 = off
    max_nonfinite: int = 20  # abort after this many consecutive steps with a non-finite loss or gradient
    compile: bool = False  # torch.compile G and D
    channels_last: bool = True  # channels_last memory format for conv nets on GPU
    deterministic: bool = False  # deterministic kernels only (bitwise-repeatable GPU runs; slower)
    ema_kimg: float = 10.0  # half-life of G's EMA in thousands of images; 0 disables EMA
    ema_rampup: float = 0.05  # EMA half-life is at most this fraction of images seen
    threads: int = 0  # torch threads per process; 0 = leave as launched
    pool_size: int = 50  # cyclegan: generated images each rank keeps to show D (0: none)
    augment: str = "none"  # stylegan2: ada (adaptive discriminator augmentation) | none
    augment_p: float = 0.0  # stylegan2: initial augmentation probability
    ada_target: float = 0.6  # ADA: target for r_t = E[sign(D(real))] (averaged over all ranks)
    ada_interval: int = 4  # ADA: adjust p every k steps
    ada_kimg: float = 500.0  # ADA: p can move from 0 to 1 in this many thousand images
    pretrain_steps: int = 0  # esrgan: the first k steps train G on the L1 term alone (the PSNR stage), then the GAN stage


@dataclass
class DegradeConfig:
    """esrgan: how each training pair's LR image is made from its HR crop (data_pipeline/degrade.py), drawn
    from (seed, epoch, sample) so that it does not depend on the world size and resumes exactly."""

    blur: float = 0.0  # probability of a Gaussian blur (random sigmas and angle) before the bicubic downsampling
    blur_sigma: float = 3.0  # largest blur sigma in HR pixels (the smallest is 0.2)
    noise: float = 0.0  # probability of Gaussian noise after the downsampling
    noise_sigma: float = 25.0  # largest noise sigma on the 0..255 scale (the smallest is 1)
    jpeg: float = 0.0  # probability of JPEG re-encoding at the end
    jpeg_quality: int = 30  # lowest JPEG quality (the highest is 95)


@dataclass
class DeepSpeedConfig:
    """strategy=deepspeed: ZeRO data parallelism, one DeepSpeed engine per network (docs/deepspeed.md)."""

    zero_stage: int = 2  # 1: partition optimiser state over ranks; 2: also gradients (3 is refused)
    bucket_size: int = 200_000_000  # elements per gradient reduce / parameter all-gather bucket (at most about the network's size)
    overlap_comm: bool = False  # stage 2: overlap the gradient reduction with the backward pass (GPU)


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # save a checkpoint every k steps (and at the end and on SIGTERM)
    keep: int = 3  # newest checkpoints kept
    milestone_every: int = 0  # also keep every checkpoint whose step is a multiple of this; 0 = none
    resume: str = "latest"  # latest | none | PATH
    init_from: str = ""  # a fresh run starts from this run dir's (or checkpoint's) network weights: new optimisers, step 0


@dataclass
class LogConfig:
    mlflow_uri: str = ""  # default sqlite:///<parent of run.dir>/mlflow.db; "none" disables
    experiment: str = "ganforge"  # MLflow experiment name
    prometheus_port: int = 0  # 0 disables the /metrics exporter
    every_steps: int = 50  # progress line, metrics.jsonl, MLflow and /metrics losses every k steps
    sample_every_steps: int = 500  # sample grids of the fixed latents every k steps
    sample_count: int = 64  # images in each sample grid
    register_model: str = ""  # register the final EMA generator under this MLflow model name; empty: not registered
    model_every_steps: int = 0  # also log the EMA generator as an MLflow model every k steps (at checkpoints); 0: only at the end


@dataclass
class EvalConfig:
    every_steps: int = 0  # evaluate the EMA generator every k steps during training; 0 = never
    metrics: str = "fid"  # comma-separated: fid, kid, pr, modes, classes, stacked
    n: int = 5000  # generated samples per evaluation
    features: str = "auto"  # auto | inception | digits | points | stacked
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
    precision: str = "auto"  # auto (accelerate's --mixed_precision, else bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 | fp64 (for equivalence checks; slow)
    strategy: str = "ddp"  # ddp | deepspeed
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "data.on_error": ("raise", "skip"),
    "model.arch": ("dcgan", "mlp", "cyclegan", "pix2pix", "stylegan2", "esrgan"),
    "model.d_arch": ("vgg", "unet"),
    "model.skip": ("none", "bicubic"),
    "model.norm": ("batch", "instance", "none"),
    "model.d_norm": ("", "batch", "instance", "none"),
    "model.direction": ("AtoB", "BtoA"),
    "data.build": ("", "sample_images", "edges2photos", "sr_photos"),
    "train.optimizer": ("adam", "rmsprop"),
    "train.augment": ("none", "ada"),
    "loss.type": ("bce", "hinge", "wgan", "wgan_gp", "lsgan", "ragan"),
    "precision": ("auto", "fp32", "bf16", "fp16", "fp64"),
    "strategy": ("ddp", "deepspeed"),
    "eval.features": ("auto", "inception", "digits", "points", "stacked"),
}
EVAL_METRICS = ("fid", "kid", "pr", "modes", "classes", "stacked", "psnr", "ssim")  # what eval.metrics may name


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
    if len(path) > 1:
        raise ConfigError(f"{key}.{path[1]}", f"{key} is a {typ.__name__}, not a section")
    if isinstance(typ, types.UnionType):
        typ = next(t for t in typ.__args__ if t is not type(None))
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


def load_config(path: str | list[str] | None, overrides: list[str] = ()) -> Config:
    """Config from YAML file(s) (or defaults) plus dotted overrides, validated. With several
    files, each is applied over the ones before it, then the overrides."""
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
    validate(cfg)
    return cfg


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Reject impossible values and combinations, naming the key."""
    flat = to_flat(cfg)
    try:
        plugged = discovered()
    except PluginError as e:
        raise ConfigError("model.arch", str(e)) from None
    for key, allowed in CHOICES.items():
        allowed = allowed + tuple(plugged) if key == "model.arch" else allowed
        if flat[key] not in allowed:
            raise ConfigError(key, f"must be one of {', '.join(allowed)}; got {flat[key]!r}")
    positive = ["train.batch_size", "train.max_steps", "train.n_critic", "train.accumulate",
                "train.max_nonfinite", "loss.r1_every", "checkpoint.every_steps",
                "checkpoint.keep", "log.every_steps", "log.sample_every_steps", "model.z_dim",
                "model.g_width", "model.d_width", "model.channels"]
    for key in positive:
        if flat[key] <= 0:
            raise ConfigError(key, f"must be > 0; got {flat[key]}")
    for key in ["train.lr_g", "train.lr_d", "model.point_scale"]:
        if flat[key] <= 0:
            raise ConfigError(key, f"must be > 0; got {flat[key]}")
    res = cfg.model.resolution
    if cfg.model.arch == "dcgan" and (res < 16 or res & (res - 1)):
        raise ConfigError("model.resolution", f"must be a power of two >= 16; got {res}")
    for key, value in to_flat(cfg).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number; got {value}")
    if not 0 <= cfg.log.prometheus_port <= 65535:
        raise ConfigError("log.prometheus_port", f"a TCP port (0 disables the exporter); got {cfg.log.prometheus_port}")
    if cfg.checkpoint.init_from and cfg.strategy == "deepspeed":
        raise ConfigError("checkpoint.init_from", "not supported with strategy=deepspeed yet (its optimiser "
                                                  "keeps its own copy of the weights); fine-tune with ddp")
    every, ckpt = cfg.log.model_every_steps, cfg.checkpoint.every_steps
    if every < 0 or every % ckpt:
        raise ConfigError("log.model_every_steps", f"must be 0 (at the end only) or a multiple of "
                                                   f"checkpoint.every_steps={ckpt}; got {every}")
    validate_eval(cfg)
    if cfg.data.num_workers < 0:
        raise ConfigError("data.num_workers", f"must be >= 0; got {cfg.data.num_workers}")
    for key in ("shuffle_block_shards", "partition_nodes", "cache_limit", "prefetch_shards"):
        if getattr(cfg.data, key) < 0:
            raise ConfigError(f"data.{key}", f"must be >= 0; got {getattr(cfg.data, key)}")
    if not 0.0 <= cfg.data.max_skip_fraction <= 1.0:  # NaN fails too
        raise ConfigError("data.max_skip_fraction", f"must be in 0..1; got {cfg.data.max_skip_fraction}")
    if not cfg.data.train:
        raise ConfigError("data.train", "required: a directory written by `ganforge data make-shards`")
    if not cfg.run.dir:
        cfg.run.dir = os.path.join("runs", cfg.run.name)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.train.batch_size % world_size:
        raise ConfigError("train.batch_size", f"global batch {cfg.train.batch_size} is not divisible "
                                              f"by the world size {world_size}")
    if (cfg.train.batch_size // world_size) % cfg.train.accumulate:
        raise ConfigError("train.accumulate", f"per-rank batch {cfg.train.batch_size // world_size} is not "
                                              f"divisible into {cfg.train.accumulate} micro-batches")
    validate_pack(cfg, world_size)
    if cfg.loss.type == "ragan" and cfg.model.arch != "esrgan":
        raise ConfigError("loss.type", f"ragan (relativistic average) is esrgan's loss, not {cfg.model.arch}'s")
    validate_freeze_d(cfg)
    if cfg.loss.type == "wgan_gp" and (cfg.model.d_norm or cfg.model.norm) == "batch" and not cfg.model.arch == "mlp":
        raise ConfigError("model.norm", "wgan_gp penalises per-sample gradients; batch norm in D breaks "
                                        "that (set model.norm=none or model.d_norm=none)")
    if cfg.eval.every_steps < 0 or cfg.eval.n < 4:
        raise ConfigError("eval.every_steps" if cfg.eval.every_steps < 0 else "eval.n",
                          "eval.every_steps must be >= 0 and eval.n >= 4")
    if not 0.0 <= cfg.train.lr_decay_start <= 1.0:
        raise ConfigError("train.lr_decay_start", f"must be in 0..1; got {cfg.train.lr_decay_start}")
    if cfg.model.num_classes < 0:
        raise ConfigError("model.num_classes", f"must be >= 0; got {cfg.model.num_classes}")
    if cfg.loss.type == "wgan" and cfg.loss.clip <= 0:
        raise ConfigError("loss.clip", f"wgan needs a positive clipping bound; got {cfg.loss.clip}")
    if cfg.precision == "fp64" and cfg.eval.every_steps:
        raise ConfigError("eval.every_steps", "evaluation runs in float32: with precision=fp64 (for equivalence "
                                              "checks) evaluate the checkpoints afterwards with `ganforge eval`")
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "")
    if cfg.precision == "auto" and launcher.lower() not in ("", "no", "bf16", "fp16"):
        raise ConfigError("precision", f"auto follows accelerate's --mixed_precision, but {launcher!r} is not "
                                       f"one ganforge trains in (no, bf16, fp16); set precision explicitly")
    if cfg.model.arch == "stylegan2":
        validate_stylegan2(cfg, world_size)
    elif cfg.train.augment != "none":
        raise ConfigError("train.augment", f"adaptive augmentation is implemented for stylegan2, not {cfg.model.arch}")
    if cfg.strategy == "deepspeed":
        validate_deepspeed(cfg)
    if cfg.model.arch in TRANSLATION_ARCHS:
        validate_translation(cfg)
    elif cfg.model.arch == "esrgan":
        validate_esrgan(cfg)
    elif cfg.model.arch in plugged and plugged[cfg.model.arch].validate:
        plugged[cfg.model.arch].validate(cfg)  # a plug-in family checks its own keys
    elif cfg.model.norm == "instance" or cfg.model.d_norm == "instance":
        raise ConfigError("model.norm", f"instance norm is for the image-to-image models, not {cfg.model.arch}")


TRANSLATION_ARCHS = ("cyclegan", "pix2pix")


def validate_eval(cfg: Config) -> None:
    """eval.*: caught here, not at the first evaluation hours into the run."""
    e = cfg.eval
    if e.every_steps < 0:
        raise ConfigError("eval.every_steps", f"must be >= 0 (0: never); got {e.every_steps}")
    if e.n <= 0:
        raise ConfigError("eval.n", f"must be > 0; got {e.n}")
    names = [m.strip() for m in e.metrics.split(",") if m.strip()]
    unknown = [m for m in names if m not in EVAL_METRICS]
    if unknown or not names:
        raise ConfigError("eval.metrics", f"{e.metrics!r}: choose from {', '.join(EVAL_METRICS)}")
    if e.every_steps and e.inception_weights and not os.path.isfile(e.inception_weights):
        raise ConfigError("eval.inception_weights", f"no such file {e.inception_weights!r}")


def validate_pack(cfg: Config, world_size: int) -> None:
    """model.pack: the GAN trainer's D (dcgan, mlp) packs each rank's micro-batch (trainer/packing.py)."""
    k = cfg.model.pack
    if k < 1:
        raise ConfigError("model.pack", f"must be >= 1 (1: no packing); got {k}")
    if k > 1 and cfg.model.arch not in ("dcgan", "mlp"):
        raise ConfigError("model.pack", f"packing is implemented for the dcgan and mlp discriminators, not "
                                        f"{cfg.model.arch}; set model.pack=1")
    micro = cfg.train.batch_size // world_size // cfg.train.accumulate
    if micro % k:
        raise ConfigError("model.pack", f"the per-rank batch of {micro} samples (train.batch_size / world size / "
                                        f"train.accumulate) is not divisible into packs of {k}")


def validate_freeze_d(cfg: Config) -> None:
    """model.freeze_d: 0..(the StyleGAN2 D's block count), stylegan2 only."""
    n, res = cfg.model.freeze_d, cfg.model.resolution
    if n == 0:
        return
    if cfg.model.arch != "stylegan2":
        raise ConfigError("model.freeze_d", f"freezing D blocks is implemented for stylegan2, not {cfg.model.arch}")
    blocks = max(res.bit_length() - 3, 0)  # one block per halving from the resolution down to 4x4
    if not 0 <= n <= blocks:
        raise ConfigError("model.freeze_d", f"must be in 0..{blocks} (D's blocks at {res}x{res}); got {n}")


def validate_deepspeed(cfg: Config) -> None:
    """What strategy=deepspeed supports: ZeRO stage 1 or 2 for the GAN trainer."""
    stage = cfg.deepspeed.zero_stage
    if stage == 3:
        raise ConfigError("deepspeed.zero_stage", "3 is not supported: ZeRO-3 shards the weights, and ganforge's "
                                                  "EMA, sampling and weight clipping need whole parameters on every rank (use 1 or 2)")
    if stage not in (1, 2):
        raise ConfigError("deepspeed.zero_stage", f"must be 1 or 2 (0 is plain data parallelism: strategy=ddp); got {stage}")
    if cfg.deepspeed.bucket_size <= 0:
        raise ConfigError("deepspeed.bucket_size", f"must be > 0; got {cfg.deepspeed.bucket_size}")
    if cfg.model.arch in TRANSLATION_ARCHS + ("esrgan",):
        raise ConfigError("strategy", f"deepspeed trains the GAN recipes; {cfg.model.arch} runs use strategy=ddp")
    if cfg.precision == "fp64":
        raise ConfigError("precision", "fp64 (for equivalence checks) runs with strategy=ddp; deepspeed trains in fp32, bf16 or fp16")
    if cfg.train.compile:
        raise ConfigError("train.compile", "torch.compile is not supported with strategy=deepspeed")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("strategy", "deepspeed is not installed in this environment "
                                      "(make install, or pip install -c constraints.txt deepspeed)")


def validate_stylegan2(cfg: Config, world_size: int) -> None:
    """What the StyleGAN2 trainer needs: its sizes, the logistic loss, and its regularisation cadences."""
    m, t, loss = cfg.model, cfg.train, cfg.loss
    if m.resolution < 8 or m.resolution & (m.resolution - 1):
        raise ConfigError("model.resolution", f"must be a power of two >= 8 for stylegan2; got {m.resolution}")
    if loss.type != "bce":
        raise ConfigError("loss.type", f"stylegan2 trains with the logistic loss (bce); got {loss.type!r}")
    for key, value, ok in (("model.num_classes", m.num_classes, 0), ("train.n_critic", t.n_critic, 1),
                           ("train.accumulate", t.accumulate, 1), ("strategy", cfg.strategy, "ddp")):
        if value != ok:
            raise ConfigError(key, f"stylegan2 runs take {key}={ok}; got {value!r}")
    for key in ("model.w_dim", "model.map_layers", "model.channel_base", "loss.pl_every", "loss.pl_batch_shrink",
                "train.ada_interval"):
        if to_flat(cfg)[key] <= 0:
            raise ConfigError(key, f"must be > 0; got {to_flat(cfg)[key]}")
    for key in ("model.style_mixing", "train.augment_p", "train.ada_target"):
        if not 0.0 <= to_flat(cfg)[key] <= 1.0:
            raise ConfigError(key, f"must be in 0..1; got {to_flat(cfg)[key]}")
    if m.mbstd_group < 0 or loss.pl_weight < 0 or loss.r1_gamma < 0 or t.ada_kimg <= 0 or not 0 < loss.pl_decay <= 1:
        key = ("model.mbstd_group" if m.mbstd_group < 0 else "loss.pl_weight" if loss.pl_weight < 0
               else "loss.r1_gamma" if loss.r1_gamma < 0 else "train.ada_kimg" if t.ada_kimg <= 0 else "loss.pl_decay")
        raise ConfigError(key, "mbstd_group, pl_weight and r1_gamma must be >= 0, ada_kimg > 0, pl_decay in (0, 1]")
    pl_batch = t.batch_size // loss.pl_batch_shrink
    if loss.pl_weight > 0 and (pl_batch == 0 or pl_batch % world_size):
        raise ConfigError("loss.pl_batch_shrink", f"the path-length batch {t.batch_size} // {loss.pl_batch_shrink} "
                                                  f"= {pl_batch} does not split over {world_size} rank(s)")


def validate_translation(cfg: Config) -> None:
    """What CycleGAN and pix2pix need, and the GAN options they do not take."""
    m, t = cfg.model, cfg.train
    if cfg.loss.type not in ("lsgan", "bce"):
        raise ConfigError("loss.type", f"{m.arch} trains with lsgan or bce; got {cfg.loss.type!r}")
    if m.arch == "cyclegan" and not cfg.data.train_b:
        raise ConfigError("data.train_b", "cyclegan needs the second domain's shards")
    if m.arch == "cyclegan" and bool(cfg.data.val) != bool(cfg.data.val_b):
        raise ConfigError("data.val_b" if cfg.data.val else "data.val", "cyclegan needs held-out shards of both domains, or neither")
    if m.arch == "cyclegan" and m.resolution % 4:
        raise ConfigError("model.resolution", f"must be a multiple of 4 for the ResNet generator; got {m.resolution}")
    if m.arch == "pix2pix" and (m.resolution < 16 or m.resolution & (m.resolution - 1)):
        raise ConfigError("model.resolution", f"must be a power of two >= 16 for the U-Net; got {m.resolution}")
    for key, value, ok in (("train.n_critic", t.n_critic, 1), ("train.accumulate", t.accumulate, 1),
                           ("model.num_classes", m.num_classes, 0), ("eval.every_steps", cfg.eval.every_steps, 0)):
        if value != ok:
            raise ConfigError(key, f"{m.arch} runs take {key}={ok} (held-out L1 is logged with the samples); got {value}")
    if t.pool_size < 0 or m.n_blocks < 0 or m.d_layers < 1:
        raise ConfigError("train.pool_size" if t.pool_size < 0 else "model.n_blocks" if m.n_blocks < 0 else "model.d_layers",
                          "must be >= 0 (d_layers >= 1)")


def validate_esrgan(cfg: Config) -> None:
    """What the super-resolution family needs: a crop the scale divides, its losses, sane degradations."""
    m, t, loss, dg = cfg.model, cfg.train, cfg.loss, cfg.degrade
    if m.scale not in (2, 4):
        raise ConfigError("model.scale", f"must be 2 or 4; got {m.scale}")
    if m.resolution % m.scale:
        raise ConfigError("model.scale", f"{m.scale} does not divide the HR crop model.resolution={m.resolution}")
    if m.d_arch == "vgg" and (m.resolution < 32 or m.resolution & (m.resolution - 1)):
        raise ConfigError("model.resolution", f"the VGG-style D takes a power of two >= 32; got {m.resolution}")
    if m.d_arch == "unet" and m.resolution % 8:
        raise ConfigError("model.resolution", f"the U-Net D takes a multiple of 8; got {m.resolution}")
    if m.d_arch == "unet" and m.spectral_norm:
        raise ConfigError("model.spectral_norm", "the U-Net D has spectral norm already; leave model.spectral_norm off")
    if loss.type not in ("ragan", "bce"):
        raise ConfigError("loss.type", f"esrgan trains with ragan (ESRGAN) or bce (Real-ESRGAN); got {loss.type!r}")
    for key, value, ok in (("train.n_critic", t.n_critic, 1), ("train.accumulate", t.accumulate, 1),
                           ("model.num_classes", m.num_classes, 0), ("eval.every_steps", cfg.eval.every_steps, 0)):
        if value != ok:
            raise ConfigError(key, f"esrgan runs take {key}={ok} (held-out PSNR/SSIM is logged with the samples); got {value}")
    for key in ("model.n_blocks", "model.growth"):
        if to_flat(cfg)[key] <= 0:
            raise ConfigError(key, f"must be > 0; got {to_flat(cfg)[key]}")
    for key in ("loss.pixel_weight", "loss.gan_weight", "loss.perceptual_weight", "train.pretrain_steps"):
        if to_flat(cfg)[key] < 0:
            raise ConfigError(key, f"must be >= 0; got {to_flat(cfg)[key]}")
    if loss.perceptual_weights and not os.path.isfile(loss.perceptual_weights):
        raise ConfigError("loss.perceptual_weights", f"no such file {loss.perceptual_weights!r} (a local torchvision "
                                                     f"VGG19 state dict; nothing is downloaded)")
    for key in ("blur", "noise", "jpeg"):
        if not 0.0 <= getattr(dg, key) <= 1.0:
            raise ConfigError(f"degrade.{key}", f"a probability in 0..1; got {getattr(dg, key)}")
    if dg.blur_sigma < 0.2 or dg.noise_sigma < 1.0 or not 1 <= dg.jpeg_quality <= 95:
        key = "degrade.blur_sigma" if dg.blur_sigma < 0.2 else "degrade.noise_sigma" if dg.noise_sigma < 1 else "degrade.jpeg_quality"
        raise ConfigError(key, "blur_sigma must be >= 0.2, noise_sigma >= 1 and jpeg_quality in 1..95")


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


# Which run a key means something to: key (or "prefix.") -> (the key that decides, its values).
# A key not named here applies to every run. MLflow logs only a run's applicable keys.
STYLEGAN2, CYCLEGAN, PIX2PIX, ESRGAN = ("stylegan2",), ("cyclegan",), ("pix2pix",), ("esrgan",)
APPLIES_WHEN: dict[str, tuple[str, tuple[str, ...]]] = {
    "deepspeed.": ("strategy", ("deepspeed",)),
    "loss.gp_weight": ("loss.type", ("wgan_gp",)),
    "loss.clip": ("loss.type", ("wgan",)),
    "model.z_dim": ("model.arch", ("dcgan", "mlp", "stylegan2")),
    "model.depth": ("model.arch", ("mlp",)),
    "model.point_scale": ("model.arch", ("mlp",)),
    "model.pack": ("model.arch", ("dcgan", "mlp")),
    "model.w_dim": ("model.arch", STYLEGAN2),
    "model.map_layers": ("model.arch", STYLEGAN2),
    "model.style_mixing": ("model.arch", STYLEGAN2),
    "model.channel_base": ("model.arch", STYLEGAN2),
    "model.mbstd_group": ("model.arch", STYLEGAN2),
    "loss.pl_": ("model.arch", STYLEGAN2),
    "train.augment": ("model.arch", STYLEGAN2),
    "train.augment_p": ("model.arch", STYLEGAN2),
    "train.ada_": ("model.arch", STYLEGAN2),
    "model.n_blocks": ("model.arch", CYCLEGAN + ESRGAN),
    "data.train_b": ("model.arch", CYCLEGAN),
    "data.val_b": ("model.arch", CYCLEGAN),
    "loss.cycle_weight": ("model.arch", CYCLEGAN),
    "loss.identity_weight": ("model.arch", CYCLEGAN),
    "train.pool_size": ("model.arch", CYCLEGAN),
    "model.d_layers": ("model.arch", TRANSLATION_ARCHS),
    "model.dropout": ("model.arch", PIX2PIX),
    "model.direction": ("model.arch", PIX2PIX),
    "loss.l1_weight": ("model.arch", PIX2PIX),
    "degrade.": ("model.arch", ESRGAN),
    "model.scale": ("model.arch", ESRGAN),
    "model.growth": ("model.arch", ESRGAN),
    "model.d_arch": ("model.arch", ESRGAN),
    "model.skip": ("model.arch", ESRGAN),
    "loss.pixel_weight": ("model.arch", ESRGAN),
    "loss.gan_weight": ("model.arch", ESRGAN),
    "loss.perceptual_": ("model.arch", ESRGAN),
    "train.pretrain_steps": ("model.arch", ESRGAN),
}


def applicable_params(cfg: Config) -> dict[str, Any]:
    """to_flat(cfg) less the keys APPLIES_WHEN rules out for this run's family, loss and strategy."""
    flat = to_flat(cfg)

    def applies(key: str) -> bool:
        for name, (decider, values) in APPLIES_WHEN.items():
            if key == name or (name.endswith((".", "_")) and key.startswith(name)):
                return flat[decider] in values
        return True

    return {k: v for k, v in flat.items() if applies(k)}


def from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config saved with to_dict (e.g. inside a checkpoint)."""
    return apply(Config(), values)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
