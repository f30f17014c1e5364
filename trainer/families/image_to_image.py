"""What the image-to-image families (CycleGAN, pix2pix: trainer/families/cyclegan.py, pix2pix.py) share.

Both follow the reference implementation's recipe: a G phase with D frozen (adversarial term
plus the L1 terms), then a D phase on real images and (for CycleGAN) a history of generated
ones, D's loss halved. Held-out shards are translated at every sample step: a grid and the
L1 / PSNR figures logged with it. Also the `translate` command's loading and file loop.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from data_pipeline import load_index
from data_pipeline.loader import decode_samples
from trainer.config import Config, ConfigError
from trainer.core import Purpose, TrainerBase, derive_seed
from trainer.data import DataCursor, to_unit_range
from trainer.distributed import DistEnv
from trainer.models import build_models
from trainer.precision import upcast
from trainer.sampling import run_in_chunks, save_grid

VAL_MAX = 256  # held-out examples measured at each sample step (the first ones of the split)


def adversarial(kind: str, out: torch.Tensor, real: bool) -> torch.Tensor:
    """The reference's GAN term: least squares to 1/0 (lsgan) or cross-entropy on logits (bce)."""
    out = upcast(out)
    if kind == "lsgan":
        return ((out - float(real)) ** 2).mean()
    return F.softplus(-out if real else out).mean()


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
    """What CycleGAN and pix2pix share for one rank: the networks and phases, the step (a G update
    with D frozen, then a D update), held-out grids and figures. A subclass reads its real batch,
    and gives its G update, its D loss and its held-out grid."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        torch.manual_seed(derive_seed(cfg.seed, Purpose.WEIGHTS))  # identical initial weights on every rank
        g, d = (m.to(env.device) for m in build_models(cfg.model))
        self.add_phases(g, d)
        self.data = DataCursor(cfg.data.train, cfg, env)

    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A images, B images) in [-1, 1]."""
        raise NotImplementedError

    def g_step(self, a: torch.Tensor, b: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple]:
        """G's update with D frozen: its statistics, and the generated images D judges next."""
        raise NotImplementedError

    def d_loss(self, a: torch.Tensor, b: torch.Tensor, fakes: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss on real and generated images, and its named terms."""
        raise NotImplementedError

    # -- the step -------------------------------------------------------------------------------
    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, env, step = self.cfg, self.env, self.state.step
        self.begin_step({"G": cfg.train.lr_g, "D": cfg.train.lr_d})
        torch.manual_seed(derive_seed(cfg.seed, step, Purpose.DROPOUT, env.rank))
        a, b = self.real_batch()
        norm_stats = self.snapshot_running_stats(self.G.module, self.D.module)  # put back if the step is skipped
        stats, fakes = self.g_step(a, b)
        stats |= self.D.update(lambda _: self.d_loss(a, b, fakes)).stats("d")
        self.finish_step([self.G.skipped, self.D.skipped], norm_stats)
        self.state.step += 1
        self.state.nimg += cfg.train.batch_size
        return stats

    # -- outputs --------------------------------------------------------------------------------
    def translator(self, direction: str) -> torch.nn.Module:
        """The generator that translates in `direction` (AtoB or BtoA)."""
        return self.G.network

    @torch.no_grad()
    def translate(self, images: torch.Tensor, direction: str = "AtoB", batch: int = 32) -> torch.Tensor:
        """Images in [-1, 1] through the generator of `direction` in eval mode, as float32 on CPU."""
        return run_in_chunks(self.translator(direction), images, batch=batch, device=self.env.device)

    def held_out_grid(self) -> tuple[list[torch.Tensor], int, dict[str, float]]:
        """Rank 0: the held-out grid's rows, its column count, and the held-out figures."""
        raise NotImplementedError

    def write_samples(self, samples_dir: str, step: int) -> tuple[str | None, dict[str, float]]:
        """Held-out grid (rows: input | translated | reconstructed, or input | output | target) and figures."""
        if self.val is None:
            return None, {}
        rows, columns, values = self.held_out_grid()
        grid = torch.cat(rows)
        path = save_grid(grid, os.path.join(samples_dir, f"step_{step:08d}.png"), nrow=columns)
        save_grid(grid, os.path.join(samples_dir, "latest.png"), nrow=columns)
        return path, values



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
def check_translation(cfg: Config) -> None:
    """What CycleGAN and pix2pix both need, and the GAN options they do not take."""
    m, t = cfg.model, cfg.train
    if cfg.loss.type not in ("lsgan", "bce"):
        raise ConfigError("loss.type", f"{m.arch} trains with lsgan or bce; got {cfg.loss.type!r}")
    for key, value, ok in (("train.n_critic", t.n_critic, 1), ("train.accumulate", t.accumulate, 1),
                           ("model.num_classes", m.num_classes, 0), ("eval.every_steps", cfg.eval.every_steps, 0)):
        if value != ok:
            raise ConfigError(key, f"{m.arch} runs take {key}={ok} (held-out L1 is logged with the samples); got {value}")

