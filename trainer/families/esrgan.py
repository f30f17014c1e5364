"""Super-resolution training (`model.arch=esrgan`): an RRDB generator, in two stages.

The PSNR stage (`train.pretrain_steps`) trains G on the L1 distance to the HR crop alone; the GAN
stage adds the perceptual term (when `loss.perceptual_weights` names a VGG19 file) and the
adversarial term against a VGG-style or U-Net D: relativistic average (ESRGAN, `loss.type=ragan`)
or plain cross-entropy (Real-ESRGAN, `loss.type=bce`). The relativistic means are over each
rank's batch, as in BasicSR's per-GPU training.

Pairs are made in the loader workers from HR image shards (data_pipeline/degrade.py): a random
crop and its degraded LR version, drawn from (seed, epoch, sample) so that they do not depend on
the world size and a resumed run sees the same pairs. Held-out shards (`data.val`, HR images of
side model.resolution) are downscaled by bicubic x scale and measured at every sample step:
PSNR/SSIM on the Y channel with `scale` border pixels cropped (BasicSR's convention), beside
plain bicubic upscaling's figures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.degrade import Degradation, bicubic_down, bicubic_up
from trainer.config import Config
from trainer.core import Purpose, TrainerBase, derive_seed
from trainer.data import DataCursor, to_unit_range
from trainer.distributed import DistEnv
from trainer.ema import EMA
from trainer.evaluation.sr_metrics import psnr_y, ssim_y
from trainer.models import build_models
from trainer.precision import upcast
from trainer.sampling import eight_bit, run_in_chunks, save_grid, spread

VAL_MAX = 64  # held-out examples measured at each sample step (the first ones of the split)
TILE_CONTEXT = 16  # LR pixels of context around each tile of `upscale --tile`: bench/tiling.py measures the seams


@dataclass(frozen=True)
class PairsFromImages:
    """The loader's transform: an image sample becomes an {"hr", "lr"} training pair."""

    degradation: Degradation

    def __call__(self, item: dict[str, torch.Tensor], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        return self.degradation(item["image"], rng)


def degradation(cfg: Config) -> Degradation:
    dg, m = cfg.degrade, cfg.model
    return Degradation(scale=m.scale, crop=m.resolution, blur=dg.blur, blur_sigma=(0.2, dg.blur_sigma),
                       noise=dg.noise, noise_sigma=(1.0, dg.noise_sigma), jpeg=dg.jpeg,
                       jpeg_quality=(dg.jpeg_quality, 95))


def gan_term(kind: str, out: torch.Tensor, other: torch.Tensor | None, real: bool) -> torch.Tensor:
    """Cross-entropy on logits that `out` is real (or fake); relativistic average (ragan): on
    `out` minus the mean of the `other` side's logits."""
    out = upcast(out)
    if kind == "ragan":
        out = out - upcast(other).mean()
    return F.softplus(-out if real else out).mean()


class ESRGANTrainer(TrainerBase):
    """ESRGAN / Real-ESRGAN-style super-resolution for one rank."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        torch.manual_seed(derive_seed(cfg.seed, Purpose.WEIGHTS))  # identical initial weights on every rank
        g, d = (m.to(env.device) for m in build_models(cfg.model))
        self.add_phases(g, d)
        self.ema = EMA(self.G.network, cfg.train.ema_kimg, cfg.train.ema_rampup)
        self.perceptual = None
        if cfg.loss.perceptual_weights and cfg.loss.perceptual_weight > 0:
            from trainer.models.esrgan import VGGPerceptual

            self.perceptual = VGGPerceptual(cfg.loss.perceptual_weights).to(env.device)
        self.data = DataCursor(cfg.data.train, cfg, env, transform=PairsFromImages(degradation(cfg)))
        self.val = held_out(cfg.data.val, cfg.model.scale) if env.is_main and cfg.data.val else None

    @property
    def gan_stage(self) -> bool:
        return self.state.step >= self.cfg.train.pretrain_steps

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        self.begin_step({"G": cfg.train.lr_g, "D": cfg.train.lr_d})
        batch = self.data.next()
        lr, hr = to_unit_range(batch["lr"]), to_unit_range(batch["hr"])
        running = self.snapshot_running_stats(self.G.module, self.D.module)  # put back if the step is skipped
        stats, fake = self.g_step(lr, hr)
        skipped = [self.G.skipped]
        if self.gan_stage:
            stats |= self.d_step(hr, fake)
            skipped.append(self.D.skipped)
        self.finish_step(skipped, running)
        self.state.step += 1
        self.state.nimg += cfg.train.batch_size
        self.ema.update(self.G.network, cfg.train.batch_size, self.state.nimg)
        return stats

    def g_step(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """L1 to the HR image, and in the GAN stage the perceptual and adversarial terms; D frozen."""
        loss_cfg, d = self.cfg.loss, self.D.network
        made: list[torch.Tensor] = []

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with self.autocast():
                fake = self.G.module(lr)
                made.append(fake)
                pixel = F.l1_loss(upcast(fake), hr)
                loss = loss_cfg.pixel_weight * pixel
                terms = {"loss/pixel": pixel}
                if self.gan_stage:
                    if self.perceptual is not None:
                        perceptual = self.perceptual(upcast(fake), hr)
                        loss = loss + loss_cfg.perceptual_weight * perceptual
                        terms["loss/perceptual"] = perceptual
                    fake_out, real_out = d(fake), d(hr).detach()
                    adv = 0.5 * (gan_term(loss_cfg.type, fake_out, real_out, True) +
                                 gan_term(loss_cfg.type, real_out, fake_out, False)) if loss_cfg.type == "ragan" \
                        else gan_term(loss_cfg.type, fake_out, None, True)
                    loss = loss + loss_cfg.gan_weight * adv
                    terms["loss/g_adv"] = adv
            return loss, terms | {"loss/g": loss}

        return self.G.update(loss_fn, frozen=self.D).stats("g"), made[0]

    def d_step(self, hr: torch.Tensor, fake: torch.Tensor) -> dict[str, torch.Tensor]:
        kind = self.cfg.loss.type

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with self.autocast():
                real_out, fake_out = self.D.module(hr), self.D.module(fake.detach())  # apart, as BN should see them
                loss = 0.5 * (gan_term(kind, real_out, fake_out, True) + gan_term(kind, fake_out, real_out, False))
            return loss, {"loss/d": loss, "d/real": upcast(real_out.detach()).mean(),
                          "d/fake": upcast(fake_out.detach()).mean()}

        return self.D.update(loss_fn).stats("d")

    # -- outputs --------------------------------------------------------------------------------
    def write_samples(self, samples_dir: str, step: int) -> tuple[str | None, dict[str, float]]:
        """Held-out grid (rows: LR nearest-upscaled | bicubic | ganforge | HR) and PSNR/SSIM beside bicubic's."""
        if self.val is None:
            return None, {}
        scale = self.cfg.model.scale
        lr, hr, bicubic = self.val["lr"], self.val["hr"], self.val["bicubic"]
        sr, values = measure(self.generator(), self.val, scale, self.env.device)
        pick = spread(len(hr))
        nearest = lr.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        grid = to_unit_range(torch.cat([torch.stack([nearest[i], bicubic[i], sr[i], hr[i]]) for i in pick]))
        path = save_grid(grid, os.path.join(samples_dir, f"step_{step:08d}.png"), nrow=4)
        save_grid(grid, os.path.join(samples_dir, "latest.png"), nrow=4)
        return path, values



def held_out(location: str, scale: int, n: int = VAL_MAX) -> dict[str, torch.Tensor]:
    """The first n HR images of `location` (uint8), their bicubic LR and the LR's bicubic upscaling."""
    from trainer.families.image_to_image import first_images

    hr = first_images(location, n)["image"]
    lr = bicubic_down(hr, scale)
    return {"hr": hr, "lr": lr, "bicubic": bicubic_up(lr, scale).round().to(torch.uint8)}


def measure(net: torch.nn.Module, val: dict[str, torch.Tensor], scale: int,
            device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[str, float]]:
    """`net`'s 8-bit upscalings of the held-out LR images, and their PSNR (dB) and SSIM beside
    bicubic's, BasicSR's convention."""
    sr = eight_bit(run_in_chunks(net, to_unit_range(val["lr"].clone()), batch=16, device=device))
    hr, bicubic = val["hr"], val["bicubic"]
    return sr, {"val/psnr": psnr_y(sr, hr, scale), "val/ssim": ssim_y(sr, hr, scale),
                "val/psnr_bicubic": psnr_y(bicubic, hr, scale), "val/ssim_bicubic": ssim_y(bicubic, hr, scale)}


def load_upscaler(run_dir: str, checkpoint: str | None = None, use_ema: bool = True):
    """(generator in eval mode, config, checkpoint path) from an esrgan run or its generator_ema.pt."""
    from trainer.checkpoint import CheckpointError
    from trainer.families import require_command
    from trainer.generate import load_checkpoint_state

    path, state, cfg = load_checkpoint_state(run_dir, checkpoint)
    require_command(cfg.model.arch, "upscale", path)
    key = "G_ema" if use_ema else "G"
    if key not in state:
        raise CheckpointError(f"{path}: no {key} weights (generator_ema.pt keeps only G_ema: pass a checkpoint "
                              f"for the raw G)")
    g, _ = build_models(cfg.model)
    g.load_state_dict(state[key])
    return g.eval(), cfg, path


def upscale_path(run_dir: str, source: str, out_dir: str, checkpoint: str | None = None, tile: int = 0,
                 use_ema: bool = True, log=print) -> list[str]:
    """Upscale an image file, or every image under a folder, into `out_dir` under the same names (and
    relative paths), `model.scale` times larger; `tile` > 0 runs the network on tiles of that many LR
    pixels (with overlapping context, so no seams) to bound memory. Returns the paths written."""
    from trainer.image_files import as_input, input_images, open_image, save_output
    from trainer.tiling import upscale_tiled

    net, cfg, _ = load_upscaler(run_dir, checkpoint, use_ema)
    root, files = input_images(source, out_dir)
    written = []
    for name in files:
        lr = as_input(open_image(os.path.join(root, name), cfg.model.channels))
        out = upscale_tiled(net, lr, cfg.model.scale, tile, TILE_CONTEXT)[0]
        written.append(save_output(out, out_dir, name))
        log(f"upscaled {len(written)}/{len(files)}: {name} {lr.shape[3]}x{lr.shape[2]} -> {out.shape[2]}x{out.shape[1]}")
    return written


def evaluate_upscaling(run_dir: str, data: str | None = None, checkpoint: str | None = None, use_ema: bool = True,
                       n: int | None = None) -> dict[str, Any]:
    """`ganforge eval --metrics psnr,ssim`: held-out PSNR/SSIM of an esrgan run and of bicubic upscaling,
    on the first n HR images of `data` (default: the run's data.val)."""
    from trainer.evaluation.errors import EvaluationError

    net, cfg, path = load_upscaler(run_dir, checkpoint, use_ema)
    data = data or cfg.data.val
    if not data:
        raise EvaluationError(f"{run_dir}: the run has no data.val; pass --data with held-out HR image shards")
    sr, values = measure(net, held_out(data, cfg.model.scale, n or 10**9), cfg.model.scale)
    return {"checkpoint": path, "n": len(sr), **{k.removeprefix("val/"): v for k, v in values.items()}}


# -- config checks -------------------------------------------------------------------------------
from trainer.config import ConfigError  # noqa: E402  (with the checks it serves)


def check_esrgan(cfg: Config, world_size: int) -> None:
    """What super-resolution needs: a crop the scale divides, a D that takes it, its losses, and a
    local VGG19 file when the perceptual term is asked for (the bounds are declared in config)."""
    m, t, loss = cfg.model, cfg.train, cfg.loss
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
    if m.n_blocks <= 0:
        raise ConfigError("model.n_blocks", f"must be > 0 (RRDB blocks); got {m.n_blocks}")
    if loss.perceptual_weights and not os.path.isfile(loss.perceptual_weights):
        raise ConfigError("loss.perceptual_weights", f"no such file {loss.perceptual_weights!r} (a local torchvision "
                                                     f"VGG19 state dict; nothing is downloaded)")
