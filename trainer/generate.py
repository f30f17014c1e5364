"""Generate from a saved run: what `ganforge sample` does."""

from __future__ import annotations

import os

import numpy as np

from data_pipeline.progress import Progress, silent
from trainer.checkpoint import CheckpointError, load_latest, read_checkpoint
from trainer.config import ConfigError, from_dict
from trainer.models import build_models
from trainer.sampling import class_cycle, generate, latents, save_samples


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
    from trainer.models import TRANSLATION_ARCHS

    path, state, cfg = load_checkpoint_state(run_dir, checkpoint)
    if cfg.model.arch in TRANSLATION_ARCHS:
        raise CheckpointError(f"{path}: a {cfg.model.arch} run translates images rather than sampling them; "
                              "use `ganforge translate`")
    key = "G_ema" if use_ema else "G"
    if key not in state:
        held = " and ".join(k for k in ("G", "G_ema") if k in state) or "no generator"
        hint = ("generator_ema.pt keeps only the EMA generator: sample it without --no-ema, or pass a "
                "checkpoint (run.dir/checkpoints/step_N) for the raw G") if key == "G" else "sample the raw G with --no-ema"
        raise CheckpointError(f"{path}: no {key} weights (it holds {held}); {hint}")
    g, _ = build_models(cfg.model)
    g.load_state_dict(state[key])
    return g.eval(), cfg, path


def sample_to_file(run_dir: str, n: int, seed: int, out: str, checkpoint: str | None = None,
                   use_ema: bool = True, truncation: float = 1.0, progress: Progress = silent) -> str:
    """Write n samples for `seed` as a PNG grid or a raw float32 .npy; returns the path.

    `truncation` < 1 pulls each w toward the mean w (StyleGAN2's truncation trick).
    """
    if not out.endswith((".png", ".npy")):
        raise ConfigError("--out", f"{out} must end in .png or .npy")
    g, cfg, path = load_generator(run_dir, checkpoint, use_ema)
    if truncation != 1.0:
        if cfg.model.arch != "stylegan2":
            raise ConfigError("--truncation", f"{path}: a {cfg.model.arch} generator has no mean w to truncate "
                                              f"toward; truncation is for stylegan2 runs (got {truncation})")
        from trainer.models.stylegan2 import Truncated

        g = Truncated(g, truncation)
    with progress(n, "sample", "images") as advance:
        samples = generate(g, latents(seed, n, cfg.model.z_dim), class_cycle(n, cfg.model.num_classes),
                           advance=advance)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".npy"):
        np.save(out, samples.numpy().astype(np.float32))
        return out
    return save_samples(samples, out)
