"""The GAN family: DCGAN, WGAN, WGAN-GP, hinge and the MLP on points, unconditional or class-conditional.

`GANTrainer` runs n_critic D updates then one G update per step, each through `Phase.update`.
"""

from __future__ import annotations

import logging
import os

import torch

from trainer.config import Config
from trainer.core import Purpose, TrainerBase, derive_seed, global_draw
from trainer.data import DataCursor, to_unit_range
from trainer.distributed import DistEnv
from trainer.ema import EMA
from trainer.models import build_models
from trainer.objectives import d_loss, g_loss, gradient_penalty, r1_penalty
from trainer.packing import pack
from trainer.precision import upcast
from trainer.sampling import generate, latents, save_samples
from trainer.sync_batchnorm import convert_sync_batchnorm

log = logging.getLogger(__name__)


class GANTrainer(TrainerBase):
    """Owns the networks, their phases and the data cursor for one run."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        gpu = env.device.type == "cuda"
        torch.manual_seed(derive_seed(cfg.seed, Purpose.WEIGHTS))  # identical initial weights on every rank
        g, d = build_models(cfg.model)
        if cfg.model.sync_bn and env.world_size > 1:
            g, d = (convert_sync_batchnorm(m, env.device) for m in (g, d))
        # Not under compile (inductor picks conv layouts itself, and torch 2.11's inductor fails on
        # channels_last weights in convolution_backward) nor DeepSpeed (it flattens contiguous params).
        channels_last = gpu and cfg.train.channels_last and cfg.model.arch == "dcgan" and not cfg.train.compile \
            and cfg.strategy == "ddp"
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        g, d = (m.to(env.device, memory_format=self.memory_format) for m in (g, d))
        self.ema = EMA(g, cfg.train.ema_kimg, cfg.train.ema_rampup)
        self.add_phases(g, d)
        self.data = DataCursor(cfg.data.train, cfg, env)
        self.points = self.data.stream.index.kind == "points"
        self.kept_fake: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.fixed_z = latents(cfg.seed, cfg.log.sample_count, cfg.model.z_dim, env.device)
        self.fixed_labels = (torch.arange(cfg.log.sample_count, device=env.device) % cfg.model.num_classes
                             if cfg.model.num_classes else None)

    # -- the step -------------------------------------------------------------------------------
    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next real batch on the device, in the model's range, with its labels if conditional."""
        batch = self.data.next()
        x = batch["points"].to(torch.get_default_dtype()) if self.points else to_unit_range(batch["image"]).contiguous(memory_format=self.memory_format)
        return x, batch.get("label") if self.cfg.model.num_classes else None

    def d_step(self, real: torch.Tensor, z: torch.Tensor, eps: torch.Tensor | None = None,
               real_labels: torch.Tensor | None = None, fake_labels: torch.Tensor | None = None,
               r1: bool = False, keep_fake: bool = False) -> dict[str, torch.Tensor]:
        """One D update over `accumulate` micro-batches: real vs G(z), plus GP / lazy R1 terms;
        D sees each micro-batch in packs of model.pack samples (PacGAN), penalties included.

        With keep_fake (one micro-batch), G(z) is computed with its graph and kept for the G
        step that follows, which then needs no second G forward (as in pytorch/examples dcgan).
        """
        cfg, g, d = self.cfg, self.G.network, self.D.module
        k = cfg.train.accumulate
        if keep_fake and k != 1:
            raise ValueError("keep_fake needs train.accumulate=1")

        def loss_fn(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            part = slice(i * len(z) // k, (i + 1) * len(z) // k)
            x, yr = real[part], real_labels[part] if real_labels is not None else None
            yf = fake_labels[part] if fake_labels is not None else None
            if keep_fake:
                with self.autocast():
                    fake = self.G.module(z, yf)
                self.kept_fake = (fake, yf)
            else:
                with torch.no_grad(), self.autocast():
                    fake = g(z[part], yf)
            x, yr, fake, yf = (pack(v, cfg.model.pack) for v in (x, yr, fake, yf))
            if r1:
                x = x.detach().requires_grad_(True)
            with self.autocast():
                real_out, fake_out = d(x, yr), d(fake.detach(), yf)
                loss = d_loss(cfg.loss.type, real_out, fake_out)
            terms = {"loss/d": loss, "d/real": upcast(real_out.detach()).mean(),
                     "d/fake": upcast(fake_out.detach()).mean()}
            if eps is not None:
                # a pack's interpolation takes the draw of its first sample
                gp = gradient_penalty(self.D.network, x, upcast(fake.detach()), eps[part][:len(x)], yr)
                loss = loss + cfg.loss.gp_weight * gp
                terms["loss/gp"] = gp
            if r1:
                penalty = r1_penalty(real_out, x)
                # Lazy regularisation: applied every r1_every steps, so scaled by r1_every.
                loss = loss + cfg.loss.r1_gamma / 2 * penalty * cfg.loss.r1_every
                terms["loss/r1"] = penalty
            return loss, terms

        update = self.D.update(loss_fn, frozen=None if keep_fake else self.G, micro_batches=k)
        if cfg.loss.type == "wgan":  # a skipped step left the weights as they were: clamped already
            self.D.clamp_weights(cfg.loss.clip)
        return update.stats("d")

    def g_step(self, z: torch.Tensor | None, labels: torch.Tensor | None = None,
               fake: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One G update on G(z), or on a `fake` kept from the D step: D frozen and unwrapped,
        so DDP reduces only G's gradients."""
        g, d = self.G.module, self.D.network
        k, n = self.cfg.train.accumulate, self.cfg.model.pack

        def loss_fn(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            if fake is not None:
                x, y = fake, labels
            else:
                part = slice(i * len(z) // k, (i + 1) * len(z) // k)
                y = labels[part] if labels is not None else None
                with self.autocast():
                    x = g(z[part], y)
            with self.autocast():
                loss = g_loss(self.cfg.loss.type, d(pack(x, n), pack(y, n)))
            return loss, {"loss/g": loss}

        return self.G.update(loss_fn, frozen=self.D, micro_batches=1 if fake is not None else k).stats("g")

    def fake_labels(self, step: int, purpose: Purpose, *index: int) -> torch.Tensor | None:
        """This rank's class labels of the fakes (conditional runs; the draw of `derive_seed(seed, step,
        purpose, *index)`, made only then)."""
        n = self.cfg.model.num_classes
        if not n:
            return None
        seed = derive_seed(self.cfg.seed, step, purpose, *index)
        full = torch.randint(n, (self.cfg.train.batch_size,), generator=torch.Generator().manual_seed(seed),
                             device="cpu")
        return full[self.env.rank::self.env.world_size].to(self.env.device)

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, env, step = self.cfg, self.env, self.state.step
        self.begin_step({"G": cfg.train.lr_g, "D": cfg.train.lr_d})
        gb, zd = cfg.train.batch_size, cfg.model.z_dim
        stats: dict[str, torch.Tensor] = {}
        skipped = []
        norm_stats = self.snapshot_running_stats(self.G.module, self.D.module)  # put back if the step is skipped
        reuse = cfg.train.accumulate == 1  # the last D step's G(z) feeds the G step
        for i in range(cfg.train.n_critic):
            real, real_labels = self.real_batch()
            z = global_draw(derive_seed(cfg.seed, step, Purpose.D_LATENTS, i), (gb, zd), env)
            eps = None
            if cfg.loss.type == "wgan_gp":
                eps = global_draw(derive_seed(cfg.seed, step, Purpose.GP_MIX, i), (gb,), env, uniform=True)
            r1 = cfg.loss.r1_gamma > 0 and (step * cfg.train.n_critic + i) % cfg.loss.r1_every == 0
            stats = self.d_step(real, z, eps, real_labels, self.fake_labels(step, Purpose.D_LABELS, i), r1,
                                keep_fake=reuse and i == cfg.train.n_critic - 1)
            skipped.append(self.D.skipped)
        if reuse:
            fake, labels = self.kept_fake
            self.kept_fake = None
            stats |= self.g_step(None, labels, fake=fake)
        else:
            stats |= self.g_step(global_draw(derive_seed(cfg.seed, step, Purpose.G_LATENTS), (gb, zd), env),
                                 self.fake_labels(step, Purpose.G_LABELS))
        self.finish_step([*skipped, self.G.skipped], norm_stats)
        self.average_buffers(self.G.network, self.D.network)
        self.state.step += 1
        self.state.nimg += gb
        self.ema.update(self.G.network, gb, self.state.nimg)
        return stats

    # -- outputs --------------------------------------------------------------------------------
    def write_samples(self, samples_dir: str, step: int) -> tuple[str, dict[str, float]]:
        """Grids (scatter plots for points) of the fixed latents from the raw G and its EMA."""
        centres = self.data.stream.index.meta.get("centres")
        raw = generate(self.G.network, self.fixed_z, self.fixed_labels)
        save_samples(raw, os.path.join(samples_dir, f"step_{step:08d}_raw.png"), centres)
        images = generate(self.ema.model, self.fixed_z, self.fixed_labels) if self.cfg.train.ema_kimg > 0 else raw
        path = save_samples(images, os.path.join(samples_dir, f"step_{step:08d}.png"), centres)
        save_samples(images, os.path.join(samples_dir, "latest.png"), centres)
        return path, {}




# -- config checks -------------------------------------------------------------------------------
from trainer.config import ConfigError  # noqa: E402  (with the checks it serves)


def check_dcgan(cfg: Config, world_size: int) -> None:
    """DCGAN's D and G halve or double the side down to 4x4, and its D's batch norm is per batch."""
    res = cfg.model.resolution
    if res < 16 or res & (res - 1):
        raise ConfigError("model.resolution", f"must be a power of two >= 16; got {res}")
    if cfg.loss.type == "wgan_gp" and (cfg.model.d_norm or cfg.model.norm) == "batch":
        raise ConfigError("model.norm", "wgan_gp penalises per-sample gradients; batch norm in D breaks "
                                        "that (set model.norm=none or model.d_norm=none)")
