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
    from trainer.config import ConfigError, load_config

    cfg = load_config(config, overrides)
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
    from trainer.models import POINT_ARCHS, SUPER_RESOLUTION_ARCHS, TRANSLATION_ARCHS

    if cfg.model.arch in TRANSLATION_ARCHS:
        return check_translation_data(cfg, index)
    if cfg.model.arch in SUPER_RESOLUTION_ARCHS:
        return check_super_resolution_data(cfg, index)

    if cfg.model.arch in POINT_ARCHS:
        if index.kind != "points":
            raise ConfigError("model.arch", f"{cfg.model.arch} models 2-D points; {cfg.data.train} holds {index.kind} samples")
        dims = index.meta.get("dims", 2)
        if dims != cfg.model.channels:
            raise ConfigError("model.channels", f"{cfg.model.channels}, but {cfg.data.train} has {dims}-D points")
        return cfg
    check_images(cfg, "data.train", index, "image")
    if cfg.model.num_classes and not index.meta.get("label_names"):
        raise ConfigError("model.num_classes", f"{cfg.data.train} has no labels for a conditional model")
    classes = len(index.meta.get("label_names") or [])
    if cfg.model.num_classes and classes > cfg.model.num_classes:
        raise ConfigError("model.num_classes", f"{cfg.model.num_classes}, but {cfg.data.train} has {classes} classes")
    return cfg


def check_run_dir(path: str) -> None:
    """run.dir can be created and written by this user; nothing is created yet."""
    from trainer.config import ConfigError

    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError("run.dir", f"{path} cannot be written ({probe} is not a writable directory)")


def check_images(cfg, key: str, index, kind: str, at_least: bool = False) -> None:
    """The shards at config `key` hold `kind` samples of the model's size (or, `at_least`, one a crop of
    that size fits in) and channel count."""
    from trainer.config import ConfigError

    where = index.root
    if index.kind != kind:
        raise ConfigError(key, f"{where} holds {index.kind} samples; {cfg.model.arch} needs {kind} samples")
    size, channels = index.meta.get("size"), index.meta.get("channels")
    if size is not None and (size < cfg.model.resolution if at_least else size != cfg.model.resolution):
        crops = "crops of " if at_least else ""
        raise ConfigError("model.resolution", f"{crops}{cfg.model.resolution}, but {where} has {size}x{size} images")
    if channels is not None and channels != cfg.model.channels:
        raise ConfigError("model.channels", f"{cfg.model.channels}, but {where} has {channels}-channel images")


def check_translation_data(cfg, index):
    """CycleGAN: two image domains (and held-out ones); pix2pix: paired shards."""
    from data_pipeline import DataError, load_index
    from trainer.config import ConfigError

    kind = "image" if cfg.model.arch == "cyclegan" else "paired"
    check_images(cfg, "data.train", index, kind)
    keys = ["data.val"] + (["data.train_b", "data.val_b"] if cfg.model.arch == "cyclegan" else [])
    for key in keys:
        location = getattr(cfg.data, key.split(".")[1])
        if not location:
            continue
        try:
            check_images(cfg, key, load_index(location), kind)
        except DataError as e:
            raise ConfigError(key, str(e)) from None
    return cfg


def check_super_resolution_data(cfg, index):
    """esrgan: HR image shards to crop training pairs from; held-out HR images of exactly the crop size."""
    from data_pipeline import DataError, load_index
    from trainer.config import ConfigError

    check_images(cfg, "data.train", index, "image", at_least=True)
    if cfg.data.val:
        try:
            check_images(cfg, "data.val", load_index(cfg.data.val), "image")
        except DataError as e:
            raise ConfigError("data.val", str(e)) from None
    return cfg


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
    from trainer.loop import TrainingError, run_training
    from trainer.preemption import EXIT_PREEMPTED, Preempted

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
