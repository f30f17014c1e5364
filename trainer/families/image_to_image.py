"""Image-to-image training: CycleGAN (unpaired, two domains) and pix2pix (paired), as phases.

Both follow the reference implementation's recipe: a G phase with D frozen (adversarial term
plus the L1 terms), then a D phase on real images and (for CycleGAN) a history of generated
ones, D's loss halved. Networks that train together are one module (G_AB + G_BA, D_A + D_B),
so one DDP wrapper and one optimiser cover each pair.

Held-out shards (`data.val`, `data.val_b`) are translated at every sample step: a grid of
input | translated | reconstructed (or target), and the L1 / PSNR figures logged with it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data_pipeline import load_index
from data_pipeline.loader import decode_samples
from trainer.config import Config
from trainer.core import Purpose, TrainerBase, derive_seed
from trainer.data import DataCursor, to_unit_range
from trainer.distributed import DistEnv, unwrap
from trainer.models import build_models
from trainer.precision import upcast
from trainer.sampling import run_in_chunks, save_grid

VAL_GRID = 8  # held-out examples pictured in each sample grid
VAL_MAX = 256  # held-out examples measured at each sample step (the first ones of the split)


def adversarial(kind: str, out: torch.Tensor, real: bool) -> torch.Tensor:
    """The reference's GAN term: least squares to 1/0 (lsgan) or cross-entropy on logits (bce)."""
    out = upcast(out)
    if kind == "lsgan":
        return ((out - float(real)) ** 2).mean()
    return F.softplus(-out if real else out).mean()


class ImagePool:
    """The last `size` generated images of this rank; D sees them in place of fresh ones half the
    time (Shrivastava et al. 2017), which steadies CycleGAN. The coin flips come from a seed."""

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        if self.size == 0:
            return images
        rng = torch.Generator().manual_seed(seed)
        out = []
        for img in images.detach():
            if len(self.images) < self.size:
                self.images.append(img.clone())
                out.append(img)
            elif torch.rand((), generator=rng) < 0.5:
                i = int(torch.randint(self.size, (), generator=rng))
                out.append(self.images[i])
                self.images[i] = img.clone()
            else:
                out.append(img)
        return torch.stack(out)

    def state_dict(self) -> torch.Tensor:
        return torch.stack(self.images).cpu() if self.images else torch.empty(0)

    def load_state_dict(self, images: torch.Tensor, device: torch.device) -> None:
        self.images = [img.to(device) for img in images][: self.size]


def first_images(location: str, n: int) -> dict[str, torch.Tensor]:
    """The first n samples of a shard directory as stored (uint8): {"image"} or, for pairs, {"a", "b"}."""
    index = load_index(location)
    items = decode_samples(index, range(min(n, index.num_samples)))
    return {k: torch.stack([it[k] for it in items]) for k in items[0] if k != "label"}


def read_images(location: str, n: int) -> dict[str, torch.Tensor]:
    """The first n samples of a shard directory, in [-1, 1]: {"image"} or, for pairs, {"a", "b"}."""
    return {k: to_unit_range(v) for k, v in first_images(location, n).items()}


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (mapped to [0, 1])."""
    mse = float(((x.clamp(-1, 1) - y) / 2).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-10))


class TranslationTrainer(TrainerBase):
    """CycleGAN (`model.arch=cyclegan`) or pix2pix (`model.arch=pix2pix`) for one rank."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        self.cycle = cfg.model.arch == "cyclegan"
        torch.manual_seed(derive_seed(cfg.seed, Purpose.WEIGHTS))  # identical initial weights on every rank
        g, d = (m.to(env.device) for m in build_models(cfg.model))
        self.add_phases(g, d)
        self.data = DataCursor(cfg.data.train, cfg, env)
        # The second domain streams on its own: its own order (seed) and its own position.
        self.data_b = DataCursor(cfg.data.train_b, cfg, env, seed=derive_seed(cfg.seed, Purpose.SECOND_DOMAIN)) if self.cycle else None
        self.pools = (ImagePool(cfg.train.pool_size), ImagePool(cfg.train.pool_size)) if self.cycle else ()
        self.gathered_pools: list[dict[str, torch.Tensor]] | None = None
        self.val = self._held_out() if env.is_main else None

    def datasets(self) -> list[DataCursor]:
        return [self.data, self.data_b] if self.cycle else [self.data]

    def _held_out(self) -> dict[str, torch.Tensor] | None:
        cfg = self.cfg
        if not cfg.data.val:
            return None
        if self.cycle:
            return {"a": read_images(cfg.data.val, VAL_MAX)["image"], "b": read_images(cfg.data.val_b, VAL_MAX)["image"]}
        return self.pair(read_images(cfg.data.val, VAL_MAX))

    def pair(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """pix2pix (input, target) from a paired batch, per `model.direction`."""
        a, b = batch["a"], batch["b"]
        return {"a": a, "b": b} if self.cfg.model.direction == "AtoB" else {"a": b, "b": a}

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A images, B images) in [-1, 1]: two domains' streams, or the two sides of pairs."""
        if self.cycle:
            return to_unit_range(self.data.next()["image"]), to_unit_range(self.data_b.next()["image"])
        pair = self.pair(self.data.next())
        return to_unit_range(pair["a"]), to_unit_range(pair["b"])

    # -- the step -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, env, step = self.cfg, self.env, self.state.step
        self.set_learning_rates(step, {"G": cfg.train.lr_g, "D": cfg.train.lr_d})
        torch.manual_seed(derive_seed(cfg.seed, step, Purpose.DROPOUT, env.rank))
        a, b = self.real_batch()
        norm_stats = self.snapshot_running_stats(self.G.module, self.D.module)  # put back if the step is skipped
        stats, fakes = (self.cycle_g_step if self.cycle else self.pix2pix_g_step)(a, b)
        stats |= self.d_step(a, b, fakes)
        self.finish_step([self.G.skipped, self.D.skipped], norm_stats)
        self.state.step += 1
        self.state.nimg += cfg.train.batch_size
        return stats

    def cycle_g_step(self, a: torch.Tensor, b: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple]:
        """Both generators: fool the other domain's D, cycle back (and map each domain to itself); D frozen."""
        cfg, d = self.cfg.loss, unwrap(self.D.module)
        made: dict[str, torch.Tensor] = {}

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with self.autocast():
                out = made["out"] = self.G.module(a, b, identity=cfg.identity_weight > 0)
                adv = adversarial(cfg.type, d.d_b(out["fake_b"]), True) + adversarial(cfg.type, d.d_a(out["fake_a"]), True)
                cycle = F.l1_loss(upcast(out["rec_a"]), a) + F.l1_loss(upcast(out["rec_b"]), b)
                loss = adv + cfg.cycle_weight * cycle
                terms = {"loss/g_adv": adv, "loss/cycle": cycle}
                if cfg.identity_weight > 0:
                    idt = F.l1_loss(upcast(out["same_b"]), b) + F.l1_loss(upcast(out["same_a"]), a)
                    loss = loss + cfg.cycle_weight * cfg.identity_weight * idt
                    terms["loss/identity"] = idt
            return loss, terms | {"loss/g": loss}

        stats = self.G.update(loss_fn, frozen=self.D).stats("g")
        return stats, (made["out"]["fake_a"], made["out"]["fake_b"])

    def pix2pix_g_step(self, a: torch.Tensor, b: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple]:
        """G(a): fool D on (a, G(a)) and stay near b in L1; D frozen."""
        cfg, d = self.cfg.loss, unwrap(self.D.module)
        made: list[torch.Tensor] = []

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with self.autocast():
                fake = self.G.module(a)
                made.append(fake)
                adv = adversarial(cfg.type, d(torch.cat([a, fake], 1)), True)
                l1 = F.l1_loss(upcast(fake), b)
                loss = adv + cfg.l1_weight * l1
            return loss, {"loss/g": loss, "loss/g_adv": adv, "loss/l1": l1}

        return self.G.update(loss_fn, frozen=self.D).stats("g"), (made[0],)

    def d_step(self, a: torch.Tensor, b: torch.Tensor, fakes: tuple) -> dict[str, torch.Tensor]:
        kind, env, step = self.cfg.loss.type, self.env, self.state.step

        def loss_fn(_: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            with self.autocast():
                if self.cycle:
                    fake_a, fake_b = (pool.query(f.detach(), derive_seed(self.cfg.seed, step, Purpose.POOL_A + i, env.rank))
                                      for i, (pool, f) in enumerate(zip(self.pools, fakes, strict=True)))
                    real_a, real_b = self.D.module(a, b)
                    out_a, out_b = self.D.module(fake_a, fake_b)
                    loss_a = 0.5 * (adversarial(kind, real_a, True) + adversarial(kind, out_a, False))
                    loss_b = 0.5 * (adversarial(kind, real_b, True) + adversarial(kind, out_b, False))
                    loss = loss_a + loss_b
                    terms = {"loss/d_a": loss_a, "loss/d_b": loss_b}
                else:
                    real_out = self.D.module(torch.cat([a, b], 1))
                    fake_out = self.D.module(torch.cat([a, fakes[0].detach()], 1))
                    loss = 0.5 * (adversarial(kind, real_out, True) + adversarial(kind, fake_out, False))
                    terms = {"d/real": upcast(real_out.detach()).mean(), "d/fake": upcast(fake_out.detach()).mean()}
            return loss, terms | {"loss/d": loss}

        return self.D.update(loss_fn).stats("d")

    # -- outputs --------------------------------------------------------------------------------
    @torch.no_grad()
    def translate(self, images: torch.Tensor, direction: str = "AtoB", batch: int = 32) -> torch.Tensor:
        """Images in [-1, 1] through G_AB (or G_BA) in eval mode, as float32 on CPU."""
        g = unwrap(self.G.module)
        net = (g.g_ab if direction == "AtoB" else g.g_ba) if self.cycle else g
        return run_in_chunks(net, images, batch=batch, device=self.env.device)

    def write_samples(self, samples_dir: str, step: int) -> tuple[str | None, dict[str, float]]:
        """Held-out grid (rows: input | translated | reconstructed, or input | output | target) and figures."""
        if self.val is None:
            return None, {}
        a, b = self.val["a"], self.val["b"]
        fake_b = self.translate(a)
        # pictured: VAL_GRID examples spread evenly over the held-out split (it is ordered by source picture)
        pick = torch.linspace(0, min(len(a), len(b)) - 1, min(VAL_GRID, len(a), len(b))).round().long().tolist()
        if self.cycle:
            fake_a = self.translate(b, "BtoA")
            rec_a, rec_b = self.translate(fake_b, "BtoA"), self.translate(fake_a)
            values = {"val/cycle_l1_a": float((rec_a - a).abs().mean()), "val/cycle_l1_b": float((rec_b - b).abs().mean())}
            rows = [torch.stack([a[i], fake_b[i], rec_a[i], b[i], fake_a[i], rec_b[i]]) for i in pick]
            columns = 6
        else:
            values = {"val/l1": float((fake_b - b).abs().mean()), "val/psnr": psnr(fake_b, b)}
            rows = [torch.stack([a[i], fake_b[i], b[i]]) for i in pick]
            columns = 3
        grid = torch.cat(rows)
        path = save_grid(grid, os.path.join(samples_dir, f"step_{step:08d}.png"), nrow=columns)
        save_grid(grid, os.path.join(samples_dir, "latest.png"), nrow=columns)
        return path, values

    def export(self) -> dict[str, Any]:
        return {"G": unwrap(self.G.module).state_dict()}

    # -- state ----------------------------------------------------------------------------------
    def gather_state(self) -> None:
        """Every rank, before a checkpoint: bring each rank's image pools to rank 0, which saves them."""
        if not self.cycle:
            return
        mine = {"a": self.pools[0].state_dict(), "b": self.pools[1].state_dict()}
        if self.env.world_size == 1:
            self.gathered_pools = [mine]
            return
        everyone: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(everyone, mine)
        self.gathered_pools = everyone

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if self.cycle:
            out |= {"data_b": self.data_b.state_dict(), "pools": self.gathered_pools}
        return out

    def load_state_dict(self, state: dict[str, Any], path: str) -> None:
        super().load_state_dict(state, path)
        if self.cycle:
            self.data_b.load_state_dict(state["data_b"])
            pools = state.get("pools") or []
            # Pools belong to ranks: rank r takes saved pool r (none when the job grew).
            mine = pools[self.env.rank] if self.env.rank < len(pools) else {"a": torch.empty(0), "b": torch.empty(0)}
            self.pools[0].load_state_dict(mine["a"], self.env.device)
            self.pools[1].load_state_dict(mine["b"], self.env.device)


def load_translator(run_dir: str, direction: str | None, checkpoint: str | None = None):
    """(network for `direction` in eval mode, config) from a CycleGAN or pix2pix run.

    `direction` None gives the whole generator: CycleGAN's pair (g_ab, g_ba), or pix2pix's one net."""
    from trainer.checkpoint import CheckpointError
    from trainer.families import require_command
    from trainer.generate import load_checkpoint_state

    path, state, cfg = load_checkpoint_state(run_dir, checkpoint)
    require_command(cfg.model.arch, "translate", path)
    g, _ = build_models(cfg.model)
    g.load_state_dict(state["G"])
    if cfg.model.arch == "pix2pix":
        if direction not in ("AtoB", None):
            raise CheckpointError(f"{path}: pix2pix translates one way only (its input to its target); "
                                  f"use --direction AtoB, not {direction}")
        net = g
    else:
        net = {"AtoB": g.g_ab, "BtoA": g.g_ba, None: g}[direction]
    return net.eval(), cfg


def translate_path(run_dir: str, direction: str, source: str, out_dir: str, checkpoint: str | None = None,
                   batch: int = 16, log=print) -> list[str]:
    """Translate an image file, or every image under a folder, into `out_dir` with the same names
    (and relative paths) and the same sizes; returns the paths written."""
    from PIL import Image

    from trainer.image_files import as_input, input_images, open_image, save_output

    net, cfg = load_translator(run_dir, direction, checkpoint)
    root, files = input_images(source, out_dir)
    side = cfg.model.resolution
    written = []
    for start in range(0, len(files), batch):
        names = files[start:start + batch]
        images = [open_image(os.path.join(root, name), cfg.model.channels) for name in names]
        x = torch.cat([as_input(img.resize((side, side), Image.Resampling.BICUBIC)) for img in images])
        y = run_in_chunks(net, x, batch=32)
        written += [save_output(out, out_dir, name, img.size) for name, img, out in zip(names, images, y, strict=True)]
        log(f"translated {len(written)}/{len(files)}")
    return written


# -- config checks -------------------------------------------------------------------------------
from trainer.config import ConfigError  # noqa: E402  (with the checks it serves)


def check_translation(cfg: Config) -> None:
    """What CycleGAN and pix2pix both need, and the GAN options they do not take."""
    m, t = cfg.model, cfg.train
    if cfg.loss.type not in ("lsgan", "bce"):
        raise ConfigError("loss.type", f"{m.arch} trains with lsgan or bce; got {cfg.loss.type!r}")
    for key, value, ok in (("train.n_critic", t.n_critic, 1), ("train.accumulate", t.accumulate, 1),
                           ("model.num_classes", m.num_classes, 0), ("eval.every_steps", cfg.eval.every_steps, 0)):
        if value != ok:
            raise ConfigError(key, f"{m.arch} runs take {key}={ok} (held-out L1 is logged with the samples); got {value}")


def check_cyclegan(cfg: Config, world_size: int) -> None:
    """CycleGAN: two domains (held-out shards of both or neither) and a side its ResNet G keeps."""
    check_translation(cfg)
    if not cfg.data.train_b:
        raise ConfigError("data.train_b", "cyclegan needs the second domain's shards")
    if bool(cfg.data.val) != bool(cfg.data.val_b):
        raise ConfigError("data.val_b" if cfg.data.val else "data.val", "cyclegan needs held-out shards of both domains, or neither")
    if cfg.model.resolution % 4:
        raise ConfigError("model.resolution", f"must be a multiple of 4 for the ResNet generator; got {cfg.model.resolution}")


def check_pix2pix(cfg: Config, world_size: int) -> None:
    """pix2pix: a side its U-Net halves down to 1x1."""
    check_translation(cfg)
    res = cfg.model.resolution
    if res < 16 or res & (res - 1):
        raise ConfigError("model.resolution", f"must be a power of two >= 16 for the U-Net; got {res}")
