"""Config contract: typed keys, dotted overrides, exit 2 with one line naming the key."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Literal

import pytest

from tests.conftest import run_cli
from trainer.config import (
    Config,
    ConfigError,
    DegradeConfig,
    ModelConfig,
    apply,
    from_dict,
    resolve,
    to_dict,
    validate,
)
from trainer.families import check_config, load_config

RECIPE = "configs/dcgan_digits.yaml"


def test_recipe_loads_with_overrides():
    cfg = load_config(RECIPE, ["train.max_steps=7", "train.lr_g=1e-3", "data.flip=true", "run.name=x"])
    assert cfg.train.max_steps == 7 and cfg.train.lr_g == 1e-3 and cfg.data.flip is True
    assert cfg.run.dir == "runs/x"
    assert from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,key", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("train.max_steps=abc", "train.max_steps"),
    ("nope.x=1", "nope"),
    ("train.batch_size=0", "train.batch_size"),
    ("loss.type=wasserstein", "loss.type"),
    ("model.resolution=48", "model.resolution"),
    ("train=3", "train"),
    ("seed.x=1", "seed.x"),
    ("data.flip=maybe", "data.flip"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [override])
    assert e.value.key == key and key in str(e.value)


def test_global_batch_must_split_over_ranks():
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(RECIPE, [], world_size=3)


def test_validate_changes_nothing_and_reads_no_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # 64 does not split over 3 ranks: only the caller's world size counts
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")  # checked at startup (prepare), not here
    cfg = apply(Config(), {"data": {"train": "unused"}, "train": {"batch_size": 64}})
    before = to_dict(cfg)
    validate(cfg, world_size=1)
    check_config(cfg, world_size=1)
    assert to_dict(cfg) == before and cfg.run.dir == ""  # run.dir is resolve's (load_config's) to fill in
    assert resolve(cfg).run.dir == "runs/run"


def test_declared_bounds_and_choices_are_enforced_by_the_generic_pass():
    """degrade.jpeg_quality and model.skip are named by no check: only their declarations hold them."""
    bounds = {f.name: f.metadata.get("bounds") for f in dataclasses.fields(DegradeConfig)}
    assert bounds["jpeg_quality"] == (1, None, 95)
    assert typing.get_type_hints(ModelConfig)["skip"] == Literal["none", "bicubic"]
    cfg = apply(Config(), {"data": {"train": "unused"}})
    cfg.degrade.jpeg_quality = 0  # set directly: no coercion on the way in
    with pytest.raises(ConfigError, match=r"config error: degrade\.jpeg_quality: must be in 1\.\.95; got 0$"):
        validate(cfg)
    cfg.degrade.jpeg_quality, cfg.model.skip = 95, "residual"
    with pytest.raises(ConfigError, match=r"config error: model\.skip: must be one of none, bicubic; got 'residual'$"):
        validate(cfg)
    cfg.model.skip, cfg.loss.pl_decay = "bicubic", 0.0  # gt and le: an open lower end
    with pytest.raises(ConfigError, match=r"loss\.pl_decay: must be in \(0, 1\]; got 0\.0$"):
        validate(cfg)


def test_literal_keys_are_coerced_to_their_choices_type_then_checked():
    assert load_config(RECIPE, ["model.scale=2"]).model.scale == 2
    for override, key in (("model.scale=3", "model.scale"), ("model.norm=group", "model.norm"),
                          ("model.scale=two", "model.scale")):
        with pytest.raises(ConfigError) as e:
            load_config(RECIPE, [override])
        assert e.value.key == key


def test_cli_exits_2_with_one_line_naming_the_key():
    r = run_cli("train", "--config", RECIPE, "train.max_stepz=3")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.max_stepz" in lines[0]


def test_cli_rejects_data_that_does_not_fit_the_model(digits_dir):
    r = run_cli("train", "--config", RECIPE, f"data.train={digits_dir}", "model.resolution=64")
    assert r.returncode == 2 and "model.resolution" in r.stderr
    r = run_cli("train", "--config", RECIPE, "data.train=/nonexistent/shards")  # not there (yet): retryable
    assert r.returncode == 1 and "data.train" in r.stderr and "/nonexistent/shards" in r.stderr


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    bad.write_text("train:\n  n_critic: 2\n  warmup: 5\n")
    with pytest.raises(ConfigError, match="train.warmup"):
        load_config(str(bad))


def test_a_compile_mode_needs_compile_and_cuda_graph_modes_one_process():
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, ["train.compile_mode=reduce-overhead"])
    assert e.value.key == "train.compile_mode" and "train.compile=true" in str(e.value)
    on = ["train.compile=true", "train.compile_mode=reduce-overhead"]
    assert load_config(RECIPE, on).train.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="one-process jobs only; with 2 processes") as e:
        load_config(RECIPE, on, world_size=2)
    assert e.value.key == "train.compile_mode"
    assert load_config(RECIPE, ["train.compile=true", "train.compile_mode=max-autotune-no-cudagraphs"], world_size=2)
    import torch

    from trainer.distributed import DistEnv
    from trainer.families.gan import GANTrainer

    with pytest.raises(ConfigError, match="one-process jobs only") as e:  # a trainer built without load_config's check
        GANTrainer(load_config(RECIPE, on), DistEnv(0, 2, 0, torch.device("cpu")))
    assert e.value.key == "train.compile_mode"


@pytest.mark.parametrize("recipe, extra, named", [
    ("configs/wgan_gp_digits.yaml", [], "wgan_gp's gradient penalty"),
    (RECIPE, ["loss.r1_gamma=1"], "R1 penalty (loss.r1_gamma=1)"),
    ("configs/stylegan2_digits.yaml", ["loss.r1_gamma=0"], "path-length penalty (loss.pl_weight=2)"),
])
def test_compile_is_refused_where_the_objective_differentiates_a_gradient(recipe, extra, named):
    """torch.compile'd networks have no second derivative (a penalty's backward raises at the first
    step), so such a run is refused at load, naming the key and the penalty; without the penalty
    the same recipe compiles."""
    with pytest.raises(ConfigError, match=re.escape(named)) as e:
        load_config(recipe, [*extra, "train.compile=true"])
    assert e.value.key == "train.compile"
    r = run_cli("train", "--config", recipe, *extra, "train.compile=true", "data.train=/nonexistent")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "train.compile" in r.stderr, r.stderr
    without = {"configs/wgan_gp_digits.yaml": ["loss.type=wgan", "loss.clip=0.01"], RECIPE: [],
               "configs/stylegan2_digits.yaml": ["loss.pl_weight=0"]}[recipe]
    assert load_config(recipe, ["loss.r1_gamma=0", *without, "train.compile=true"]).train.compile


@pytest.mark.parametrize("override", ["log.model_every_steps=-5", "log.model_every_steps=7"])
def test_model_every_steps_must_be_a_multiple_of_the_checkpoint_cadence(override):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, ["checkpoint.every_steps=5", override])
    assert e.value.key == "log.model_every_steps" and "checkpoint.every_steps=5" in str(e.value)
    assert load_config(RECIPE, ["checkpoint.every_steps=5", "log.model_every_steps=10"]).log.model_every_steps == 10


def test_a_family_validate_of_one_or_two_arguments_is_called(monkeypatch):
    """Plug-ins written for validate(cfg) keep working beside validate(cfg, world_size)."""
    from trainer import families
    from trainer.config import Config, ConfigError

    seen = []

    def one(cfg):
        seen.append("one")
        raise ConfigError("model.z_dim", "refused by a one-argument check")

    def two(cfg, world_size):
        seen.append(("two", world_size))

    base = families.FAMILIES["dcgan"]
    cfg = Config()
    cfg.data.train, cfg.run.dir = "shards", "runs/x"
    for name, check in (("one_arg", one), ("two_args", two)):
        monkeypatch.setitem(families.FAMILIES, name, families.Family(base.trainer, "noise", "sample", base.check_data,
                                                                     build=base.build, validate=check))
    cfg.model.arch = "one_arg"
    with pytest.raises(ConfigError, match="one-argument"):
        families.check_config(cfg, 2)
    cfg.model.arch = "two_args"
    families.check_config(cfg, 2)
    assert seen == ["one", ("two", 2)]
