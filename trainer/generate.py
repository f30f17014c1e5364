"""Generate from a saved run: what `ganforge sample` does."""

from __future__ import annotations

import os

import numpy as np
import torch

from data_pipeline.progress import Progress, silent
from trainer.checkpoint import CheckpointError, load_latest, read_checkpoint
from trainer.config import ConfigError, from_dict
from trainer.models import build_models
from trainer.sampling import class_cycle, eight_bit, generate, latents, save_samples


def load_checkpoint_state(run_dir: str, checkpoint: str | None = None):
    """(checkpoint path, its state, its config): `checkpoint`, or the newest valid one of the run."""
    if checkpoint:
        path, state = checkpoint, read_checkpoint(checkpoint)
    else:
        if not os.path.isdir(run_dir):
            raise CheckpointError(f"{run_dir}: no such run directory")
        found = load_latest(run_dir)
        if found is None:
            raise CheckpointError(f"{run_dir}: no valid checkpoint in {os.path.join(run_dir, 'checkpoints')}")
        path, state = found
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path}: no 'config' entry, so not a ganforge checkpoint or generator_ema.pt "
                              f"(a bare state_dict cannot be sampled: its architecture is unknown)")
    return path, state, from_dict(state["config"])


def load_generator(run_dir: str, checkpoint: str | None = None, use_ema: bool = True):
    """(generator in eval mode, config, checkpoint path) from a run directory."""
    from trainer.families import require_command

    path, state, cfg = load_checkpoint_state(run_dir, checkpoint)
    require_command(cfg.model.arch, "sample", path)
    key = "G_ema" if use_ema else "G"
    if key not in state:
        held = " and ".join(k for k in ("G", "G_ema") if k in state) or "no generator"
        hint = ("generator_ema.pt keeps only the EMA generator: sample it without --no-ema, or pass a "
                "checkpoint (run.dir/checkpoints/step_N) for the raw G") if key == "G" else "sample the raw G with --no-ema"
        raise CheckpointError(f"{path}: no {key} weights (it holds {held}); {hint}")
    g, _ = build_models(cfg.model)
    g.load_state_dict(state[key])
    return g.eval(), cfg, path


def parse_seeds(text: str) -> list[int]:
    """'0-3,7' -> [0, 1, 2, 3, 7] (ranges inclusive, as in StyleGAN2-ADA's generate.py)."""
    seeds: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        try:
            seeds += list(range(int(low), int(high) + 1)) if dash else [int(low)]
        except ValueError:
            raise ConfigError("--seeds", f"{text!r}: expected seeds like 0-99 or 1,5,7") from None
    if not seeds or min(seeds) < 0 or min(seeds) >= 2 ** 32 or max(seeds) >= 2 ** 32:
        raise ConfigError("--seeds", f"{text!r}: seeds must be in 0..2^32-1, at least one")
    return seeds


def seed_latents(seeds: list[int], z_dim: int) -> torch.Tensor:
    """Latent row k = np.random.RandomState(seeds[k]).randn(z_dim), the reference's convention."""
    return torch.from_numpy(np.stack([np.random.RandomState(s).randn(z_dim) for s in seeds])).float()


def file_latents(path: str, z_dim: int) -> torch.Tensor:
    """Latents (N, z_dim) from a .npy file (never unpickled)."""
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError("--z", f"{path}: cannot read a .npy array ({e})") from None
    if z.ndim != 2 or z.shape[1] != z_dim or z.shape[0] < 1 or not np.issubdtype(z.dtype, np.floating):
        raise ConfigError("--z", f"{path}: expected a float array of shape (N, {z_dim}) for this run; got "
                                 f"{z.dtype} {tuple(z.shape)}")
    if not np.isfinite(z).all():
        raise ConfigError("--z", f"{path}: holds non-finite values")
    return torch.from_numpy(z.astype(np.float32))


def sample_to_file(run_dir: str, n: int, seed: int, out: str, checkpoint: str | None = None,
                   use_ema: bool = True, truncation: float = 1.0, progress: Progress = silent, *,
                   z_file: str | None = None, seeds: str | None = None, noise_mode: str = "const") -> str:
    """Write samples as a PNG grid, a raw float32 .npy, or one PNG each into a folder (`out` ending in /).

    The latents are n rows drawn with `seed`, or one row per seed of `seeds` ('0-9'; the
    reference's RandomState convention), or the rows of the .npy file `z_file`.
    `truncation` < 1 pulls each w toward the mean w (StyleGAN2's truncation trick); `noise_mode`
    (StyleGAN2) picks the per-layer noise: the stored maps (const), fresh ones drawn from
    `seed` (random), or zero (none).
    """
    folder = out.endswith(os.sep)
    if not folder and not out.endswith((".png", ".npy")):
        raise ConfigError("--out", f"{out} must end in .png or .npy, or be a folder ending in /")
    g, cfg, path = load_generator(run_dir, checkpoint, use_ema)
    if truncation != 1.0 or noise_mode != "const":
        if cfg.model.arch != "stylegan2":
            flag = "--truncation" if truncation != 1.0 else "--noise-mode"
            raise ConfigError(flag, f"{path}: a {cfg.model.arch} generator has no mean w or noise inputs; "
                                    f"{flag} is for stylegan2 runs")
        from trainer.models.stylegan2 import SamplingGenerator

        g = SamplingGenerator(g, truncation, noise_mode, seed)
    names = None
    if seeds is not None:
        chosen = parse_seeds(seeds)
        z, names = seed_latents(chosen, cfg.model.z_dim), [f"seed{s:04d}.png" for s in chosen]
    elif z_file is not None:
        z = file_latents(z_file, cfg.model.z_dim)
    else:
        z = latents(seed, n, cfg.model.z_dim)
    with progress(len(z), "sample", "images") as advance:
        samples = generate(g, z, class_cycle(len(z), cfg.model.num_classes), advance=advance)
    if folder:
        return save_each(samples, out, names or [f"{i:06d}.png" for i in range(len(samples))])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".npy"):
        np.save(out, samples.numpy().astype(np.float32))
        return out
    return save_samples(samples, out)


def save_each(images: torch.Tensor, folder: str, names: list[str]) -> str:
    """One 8-bit PNG per image (`eight_bit`, as the reference writes them)."""
    from PIL import Image

    if images.dim() != 4:
        raise ConfigError("--out", "a folder of PNGs needs images; this run generates 2-D points (use .npy or .png)")
    os.makedirs(folder, exist_ok=True)
    pixels = eight_bit(images).permute(0, 2, 3, 1).numpy()
    for img, name in zip(pixels, names, strict=True):
        target = os.path.join(folder, name)
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(target + ".tmp.png")
        os.replace(target + ".tmp.png", target)
    return folder
