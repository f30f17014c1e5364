"""ganforge from Python: train a run, load a run's generator, generate images.

    from trainer import api

    summary = api.train("configs/dcgan_digits.yaml", ["data.train=data/digits", "run.dir=runs/d"])
    g, cfg = api.load_generator("runs/d")
    images = api.generate(g, cfg, n=16, seed=0)  # (16, C, H, W) in [-1, 1], float32 on the CPU

`train` runs in this process: alone, or as one rank when the process was started by torchrun
or accelerate (then every rank calls it). Errors are the CLI's: ConfigError (a bad config),
DataError, CheckpointError, TrainingError and Preempted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainer.config import Config
from trainer.sampling import class_cycle, latents, run_in_chunks


def train(config: str | list[str], overrides: list[str] = ()) -> dict[str, Any]:
    """Train per the YAML recipe(s) and dotted overrides, resuming from run.dir's newest checkpoint;
    returns the summary (step, checkpoint, samples, run_dir, MLflow run) on rank 0."""
    from trainer.main import prepare
    from trainer.run import run_training

    return run_training(prepare(config, list(overrides)))


def load_generator(run_dir: str, checkpoint: str | None = None, use_ema: bool = True) -> tuple[nn.Module, Config]:
    """A run's generator in eval mode on the CPU (its EMA unless `use_ema` is False) and its config.
    Image-to-image runs give the network that `translate` or `upscale` uses."""
    from trainer.families import family
    from trainer.generate import load_checkpoint_state

    _, _, cfg = load_checkpoint_state(run_dir, checkpoint)
    command = family(cfg.model.arch).command
    if command == "translate":
        from trainer.families.image_to_image import load_translator

        return load_translator(run_dir, None, checkpoint)
    if command == "upscale":
        from trainer.families.esrgan import load_upscaler

        return load_upscaler(run_dir, checkpoint, use_ema)[:2]
    from trainer.generate import load_generator as load

    return load(run_dir, checkpoint, use_ema)[:2]


def generate(g: nn.Module, cfg: Config, n: int, seed: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
    """n images from latents drawn with `seed` (the rows `ganforge sample --seed` draws), labels
    0, 1, 2, ... for a conditional model unless given."""
    z = latents(seed, n, cfg.model.z_dim)
    if labels is None:
        labels = class_cycle(n, cfg.model.num_classes)
    return run_in_chunks(g, z, labels)
