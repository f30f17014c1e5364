"""Entry point of one training process: `accelerate launch trainer/main.py --config F [k=v ...]`.

Also what torchrun runs and what `ganforge train` calls for a single process. The config is
validated before any process group starts; a bad one exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):
    # Run as a script: import the `trainer` package, not this folder's modules as top-level ones.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

log = logging.getLogger("trainer.main")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trainer/main.py", description="Train a GAN (one process of the job).")
    p.add_argument("--config", required=True, help="YAML recipe, e.g. configs/dcgan_digits.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=30")
    return p.parse_args(argv)


def prepare(config: str, overrides: list[str]):
    """Load and check the config against the data, before any process group exists."""
    from data_pipeline import DataError, load_index
    from data_pipeline.index import INDEX_NAME, is_url
    from trainer.config import ConfigError
    from trainer.families import family, load_config
    from trainer.precision import check_launcher_precision

    cfg = load_config(config, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_launcher_precision(cfg.precision)
    check_run_dir(cfg.run.dir)
    if cfg.checkpoint.init_from and not os.path.exists(cfg.checkpoint.init_from):
        raise ConfigError("checkpoint.init_from", f"no such run directory or checkpoint: {cfg.checkpoint.init_from}")
    if cfg.data.build:
        from data_pipeline.packaged import ensure_built

        root = os.path.dirname(os.path.abspath(cfg.data.train))
        try:
            if ensure_built(cfg.data.build, root, cfg.model.resolution):
                log.info("built the %s dataset in %s", cfg.data.build, root)
        except DataError as e:
            raise ConfigError("data.build", str(e)) from None
    try:
        index = load_index(cfg.data.train)
    except DataError as e:
        if not is_url(cfg.data.train) and not os.path.isfile(os.path.join(cfg.data.train, INDEX_NAME)):
            # A data volume that is not mounted yet: retryable (exit 1), unlike a wrong config.
            raise DataError(f"data.train: no {INDEX_NAME} in {cfg.data.train} (not written, or its volume "
                            f"not mounted yet); the same command can be retried") from None
        raise ConfigError("data.train", str(e)) from None
    family(cfg.model.arch).check_data(cfg, index)
    return cfg


def check_run_dir(path: str) -> None:
    """run.dir can be created and written by this user; nothing is created yet."""
    from trainer.config import ConfigError

    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("run.dir", f"{path} cannot be written ({probe} is not a writable directory)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from trainer.logs import setup

    setup()
    from data_pipeline import DataError
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError

    try:
        cfg = prepare(args.config, args.overrides)
    except ConfigError as e:
        print(f"ganforge: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"ganforge: error: {e}", file=sys.stderr)
        return 1
    from trainer.core import TrainingError
    from trainer.preemption import EXIT_PREEMPTED, Preempted
    from trainer.run import run_training

    try:
        run_training(cfg)
    except Preempted as e:
        print(f"ganforge: {e}; re-run the same command to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    except (DataError, CheckpointError, TrainingError) as e:
        print(f"ganforge: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
