"""StyleGAN2 with adaptive augmentation, trained as StyleGAN2-ADA's four phases.

Each step runs, in order (as `training_loop.py` of stylegan2-ada-pytorch does):

- Gmain: non-saturating logistic loss of D(augment(G(z))), D frozen;
- Greg (every `loss.pl_every` steps): path-length penalty on half a batch, weighted by
  `loss.pl_weight * pl_every`; the running mean length follows the mean over all ranks, and
  the penalty's gradient flows through it;
- Dmain: logistic loss on augmented real and generated images;
- Dreg (every `loss.r1_every` steps): R1 on real images (through the augmentation), weighted
  by `loss.r1_gamma / 2 * r1_every`.

D's outputs on real images in Dmain and Dreg drive ADA's p; every mapping call on a training
latent (Gmain, Greg, Dmain) moves w_avg. The regularisation phases take their own optimiser
steps, so both optimisers use the lazy regularisation correction: lr and Adam's betas raised
to the power k / (k + 1), whether or not the penalty's weight is 0 (as the reference does).
docs/stylegan2.md lists where this follows the reference and where it departs from it.

Every random number (latents, style-mixing cutoffs, noise maps, augmentation, path-length
projections) is drawn for the global batch from (seed, step, what it is for) and sliced by rank,
so a run resumes exactly and the global batch is the same computation on any number of ranks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from trainer.augment import RANDOM_COLUMNS, AdaptiveP, augment
from trainer.config import Config
from trainer.core import Purpose, TrainerBase, Update, derive_seed, global_draw
from trainer.data import DataCursor, to_unit_range
from trainer.distributed import DistEnv, mean_across
from trainer.ema import EMA
from trainer.models import build_models
from trainer.objectives import r1_penalty
from trainer.precision import upcast
from trainer.sampling import generate, latents, save_samples

# What each draw is for: the last part of its seed (seed, step, purpose, ...).
Z, Z_MIX, MIXING, NOISE, AUG, PL_NOISE = range(1, 7)
GMAIN, GREG, DMAIN, DREG = 10, 20, 30, 40


def lazy_ratio(every: int) -> float:
    """The lazy-regularisation correction k / (k + 1) for lr and betas.

    The reference applies it whenever its phase has a regularisation interval (always, in its
    train.py), also with a zero weight (e.g. its cifar config's pl_weight=0), so here too."""
    return every / (every + 1)


def draw(seed: int, shape: tuple[int, ...], env: DistEnv, uniform: bool = False) -> torch.Tensor:
    """This rank's rows of a global-batch draw; on a GPU the draw is made there (noise maps are big)."""
    if env.device.type != "cuda":
        return global_draw(seed, shape, env, uniform)
    gen = torch.Generator(env.device).manual_seed(seed)
    full = (torch.rand if uniform else torch.randn)(shape, generator=gen, device=env.device)
    return full[env.rank::env.world_size]


class StyleGAN2Trainer(TrainerBase):
    """StyleGAN2 (`model.arch=stylegan2`) for one rank, with `train.augment=ada|none`."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        torch.manual_seed(derive_seed(cfg.seed, Purpose.WEIGHTS))  # identical initial weights on every rank
        g, d = (m.to(env.device) for m in build_models(cfg.model))
        self.ema = EMA(g, cfg.train.ema_kimg, cfg.train.ema_rampup)
        if cfg.model.freeze_d:  # Freeze-D (the ADA paper's transfer setting): the input side of D stays fixed
            self.freeze(d.from_rgb, *d.blocks[:cfg.model.freeze_d])
        self.add_phases(g, d)
        loss = cfg.loss
        self.g_ratio, self.d_ratio = lazy_ratio(loss.pl_every), lazy_ratio(loss.r1_every)
        for phase, ratio in ((self.G, self.g_ratio), (self.D, self.d_ratio)):
            for group in phase.opt.param_groups:
                if "betas" in group:
                    group["betas"] = (cfg.train.beta1 ** ratio, cfg.train.beta2 ** ratio)
        self.pl_mean = torch.zeros((), device=env.device)
        self.ada = AdaptiveP(cfg.train.augment_p, cfg.train.ada_target, cfg.train.ada_interval,
                             cfg.train.ada_kimg, cfg.train.batch_size, adaptive=cfg.train.augment == "ada")
        # The regularisers' latest figures, reported every step (they run every k steps).
        zero = self.zero = torch.zeros((), device=env.device)  # host figures reach the statistics as zero + x
        self.last_reg = ({"loss/pl": zero, "grad_norm/g_reg": zero} if loss.pl_weight > 0 else {}) | \
            ({"loss/r1": zero, "grad_norm/d_reg": zero} if loss.r1_gamma > 0 else {})
        self.data = DataCursor(cfg.data.train, cfg, env)
        self.fixed_z = latents(cfg.seed, cfg.log.sample_count, cfg.model.z_dim, env.device)

    # -- random inputs --------------------------------------------------------------------------
    def g_inputs(self, purpose: int, n: int) -> dict[str, Any]:
        """G's random inputs for `n` global samples: z, a second z and the mixing cutoff, noise maps.

        Style mixing as the reference: one coin and one cutoff layer for the whole batch. The
        reference draws them per GPU (and per accumulation round); here once per global batch,
        so the computation does not depend on the number of ranks."""
        cfg, env, step = self.cfg, self.env, self.state.step
        g = self.G.network
        z_dim = cfg.model.z_dim
        out: dict[str, Any] = {"z": draw(derive_seed(cfg.seed, step, purpose, Z), (n, z_dim), env)}
        if cfg.model.style_mixing > 0:
            coin, where = torch.rand(2, generator=torch.Generator().manual_seed(  # on the host: no device sync
                derive_seed(cfg.seed, step, purpose, MIXING)), device="cpu").tolist()
            cutoff = 1 + int(where * (g.num_ws - 1)) if coin < cfg.model.style_mixing else g.num_ws  # 1..num_ws-1
            out["z_mix"] = draw(derive_seed(cfg.seed, step, purpose, Z_MIX), (n, z_dim), env)
            out["mix_cutoff"] = torch.full((len(out["z"]),), cutoff, device=env.device)
        out["noise"] = [draw(derive_seed(cfg.seed, step, purpose, NOISE, i), shape, env)
                        for i, shape in enumerate(g.noise_shapes(n))]
        return out

    def augmented(self, images: torch.Tensor, purpose: int, which: int) -> torch.Tensor:
        """`images` (this rank's rows of the global batch) through ADA at the current p."""
        if self.ada.p <= 0:
            return images
        u = draw(derive_seed(self.cfg.seed, self.state.step, purpose, AUG, which),
                 (len(images) * self.env.world_size, RANDOM_COLUMNS), self.env, uniform=True)
        return augment(images, u, self.ada.p)

    # -- the phases -----------------------------------------------------------------------------
    def g_main(self) -> dict[str, torch.Tensor]:
        """Gmain: softplus(-D(augment(G(z)))), D frozen and unwrapped so DDP reduces only G."""
        d = self.D.network

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with self.autocast():
                fake = self.G.module(**self.g_inputs(GMAIN, self.cfg.train.batch_size), update_w_avg=True)
                loss = F.softplus(-upcast(d(self.augmented(fake, GMAIN, 0)))).mean()
            return loss, {"loss/g": loss}

        return self.G.update(loss_fn, frozen=self.D).stats("g")

    def path_length(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(penalty of this rank's rows, the updated running mean): E[(|J_w^T y| - a)^2], y ~ N(0, I) / sqrt(HW).

        The mean length a follows the mean over ALL ranks' samples, so it is the same everywhere,
        and, as in the reference, the penalty's gradient also flows through a's batch mean.
        """
        cfg = self.cfg
        n = cfg.train.batch_size // cfg.loss.pl_batch_shrink
        with self.autocast():
            img, ws = self.G.module(**self.g_inputs(GREG, n), update_w_avg=True, return_ws=True)
        res = img.shape[2] * img.shape[3]
        y = draw(derive_seed(cfg.seed, self.state.step, GREG, PL_NOISE), (n, *img.shape[1:]), self.env) / res ** 0.5
        (grad,) = torch.autograd.grad((upcast(img) * y).sum(), ws, create_graph=True)
        lengths = upcast(grad).square().sum(2).mean(1).sqrt()
        batch_mean = mean_across(lengths.detach().mean().reshape(1), self.env)[0]
        pl_mean = self.pl_mean.lerp(batch_mean, cfg.loss.pl_decay)
        penalty = (lengths - pl_mean).square().mean()
        # The reference keeps pl_mean = lerp(a, lengths.mean()) in the graph, the mean of its
        # per-GPU batch. Here the mean is the global batch's: d penalty / d a over all ranks is
        # -2 (batch_mean - a), and d a / d length_i = decay / N, so each length gets that product.
        # Added as a term that is 0 in value, it makes DDP's averaged gradient the exact gradient
        # of the global-batch penalty on any number of ranks (on one: the reference's).
        through_mean = -2 * cfg.loss.pl_decay * (batch_mean - pl_mean)
        penalty = penalty + (through_mean * (lengths - lengths.detach())).mean()
        # img[:, 0, 0, 0] * 0 ties every G parameter into the graph, which DDP's reducer expects.
        return penalty + upcast(img[:, 0, 0, 0]).mean() * 0, pl_mean

    def g_reg(self) -> Update:
        """Greg: the lazy path-length penalty, weighted by pl_weight * pl_every."""

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            penalty, self.pl_mean = self.path_length()
            return penalty * self.cfg.loss.pl_weight * self.cfg.loss.pl_every, {"loss/pl": penalty}

        return self.G.update(loss_fn, frozen=self.D)

    def d_main(self, real: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dmain: softplus(D(augment(G(z)))) + softplus(-D(augment(x))); counts sign(D(real)) for ADA.

        Its mapping call moves w_avg, as Gmain's and Greg's do (the reference updates w_avg in
        every training-mode mapping call but the style-mixing one)."""
        g = self.G.network

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with torch.no_grad(), self.autocast():
                fake = g(**self.g_inputs(DMAIN, self.cfg.train.batch_size), update_w_avg=True)
            with self.autocast():
                fake_out = self.D.module(self.augmented(fake, DMAIN, 0))
                real_out = self.D.module(self.augmented(real, DMAIN, 1))
                loss = F.softplus(upcast(fake_out)).mean() + F.softplus(-upcast(real_out)).mean()
            self.ada.observe(real_out)
            return loss, {"loss/d": loss, "d/real": upcast(real_out.detach()).mean(),
                          "d/fake": upcast(fake_out.detach()).mean()}

        return self.D.update(loss_fn, frozen=self.G).stats("d")

    def r1(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R1 of this rank's rows, D's outputs): E||grad_x D(augment(x))||^2 at the un-augmented reals."""
        x = real.detach().requires_grad_(True)
        with self.autocast():
            out = self.D.module(self.augmented(x, DREG, 0))
        return r1_penalty(out, x), out

    def d_reg(self, real: torch.Tensor) -> Update:
        """Dreg: lazy R1, weighted by r1_gamma / 2 * r1_every; counts sign(D(real)) for ADA, as the
        reference's augment statistic collects Loss/signs/real from Dmain and Dreg alike."""

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            penalty, out = self.r1(real)
            self.ada.observe(out)
            loss = penalty * (self.cfg.loss.r1_gamma / 2) * self.cfg.loss.r1_every + upcast(out).mean() * 0
            return loss, {"loss/r1": penalty}

        return self.D.update(loss_fn, frozen=self.G)

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, env, step = self.cfg, self.env, self.state.step
        self.begin_step({"G": cfg.train.lr_g * self.g_ratio, "D": cfg.train.lr_d * self.d_ratio})
        real = to_unit_range(self.data.next()["image"])
        stats = self.g_main()
        skipped = [self.G.skipped]
        if cfg.loss.pl_weight > 0 and step % cfg.loss.pl_every == 0:
            reg = self.g_reg()
            skipped.append(reg.skipped)
            self.last_reg |= reg.terms | {"grad_norm/g_reg": reg.grad_norm}
        stats |= self.d_main(real)
        skipped.append(self.D.skipped)
        if cfg.loss.r1_gamma > 0 and step % cfg.loss.r1_every == 0:
            reg = self.d_reg(real)
            skipped.append(reg.skipped)
            self.last_reg |= reg.terms | {"grad_norm/d_reg": reg.grad_norm}
        self.ada.update(step, env)
        # w_avg moved by lerps (linear) with each rank's batch means: their mean over ranks is the
        # global batch's result (the reference keeps a w_avg per GPU, unsynchronised).
        self.average_buffers(self.G.network)
        # The ramp-up counts the images seen BEFORE this step, as the reference's cur_nimg (so the
        # first step copies G into the EMA).
        self.ema.update(self.G.network, cfg.train.batch_size, self.state.nimg)
        self.state.step += 1
        self.state.nimg += cfg.train.batch_size
        self.finish_step(skipped)  # no running statistics in StyleGAN2
        return stats | self.last_reg | {"augment/p": self.zero + self.ada.p, "augment/rt": self.zero + self.ada.rt,
                                        "loss/pl_mean": self.pl_mean.detach().clone()}

    # -- outputs --------------------------------------------------------------------------------
    def write_samples(self, samples_dir: str, step: int) -> tuple[str, dict[str, float]]:
        """Grids of the fixed latents (fixed noise) from the raw G and its EMA."""
        raw = generate(self.G.network, self.fixed_z)
        save_samples(raw, os.path.join(samples_dir, f"step_{step:08d}_raw.png"))
        images = generate(self.ema.model, self.fixed_z) if self.cfg.train.ema_kimg > 0 else raw
        path = save_samples(images, os.path.join(samples_dir, f"step_{step:08d}.png"))
        save_samples(images, os.path.join(samples_dir, "latest.png"))
        return path, {}


    # -- state ----------------------------------------------------------------------------------
    def gather_state(self) -> None:
        super().gather_state()
        self.ada.gather(self.env)

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"augment": self.ada.state_dict(),
                                       "pl_mean": self.pl_mean.cpu()}

    def load_state_dict(self, state: dict[str, Any], path: str) -> None:
        super().load_state_dict(state, path)
        self.ada.load_state_dict(state["augment"], self.env)
        self.pl_mean = state["pl_mean"].to(self.env.device)


# -- config checks -------------------------------------------------------------------------------
from trainer.config import ConfigError, refuse_compile_with  # noqa: E402  (with the checks they serve)


def check_stylegan2(cfg: Config, world_size: int) -> None:
    """What the StyleGAN2 trainer needs: its sizes, the logistic loss, one D step per G step, and a
    path-length batch that splits over the ranks (the bounds of its keys are declared in config)."""
    m, t, loss = cfg.model, cfg.train, cfg.loss
    if m.resolution < 8 or m.resolution & (m.resolution - 1):
        raise ConfigError("model.resolution", f"must be a power of two >= 8 for stylegan2; got {m.resolution}")
    if loss.type != "bce":
        raise ConfigError("loss.type", f"stylegan2 trains with the logistic loss (bce); got {loss.type!r}")
    for key, value, ok in (("model.num_classes", m.num_classes, 0), ("train.n_critic", t.n_critic, 1),
                           ("train.accumulate", t.accumulate, 1)):
        if value != ok:
            raise ConfigError(key, f"stylegan2 runs take {key}={ok}; got {value!r}")
    blocks = max(m.resolution.bit_length() - 3, 0)  # one D block per halving from the resolution down to 4x4
    if m.freeze_d > blocks:
        raise ConfigError("model.freeze_d", f"must be in 0..{blocks} (D's blocks at {m.resolution}x{m.resolution}); "
                                            f"got {m.freeze_d}")
    if t.compile and loss.pl_weight > 0:
        raise refuse_compile_with(f"the path-length penalty (loss.pl_weight={loss.pl_weight:g})")
    pl_batch = t.batch_size // loss.pl_batch_shrink
    if loss.pl_weight > 0 and (pl_batch == 0 or pl_batch % world_size):
        raise ConfigError("loss.pl_batch_shrink", f"the path-length batch {t.batch_size} // {loss.pl_batch_shrink} "
                                                  f"= {pl_batch} does not split over {world_size} rank(s)")
