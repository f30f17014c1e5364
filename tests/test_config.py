"""Config contract: typed keys, dotted overrides, exit 2 with one line naming the key."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from trainer.config import ConfigError, from_dict, load_config, to_dict

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


def test_global_batch_must_split_over_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config(RECIPE, [])


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


@pytest.mark.parametrize("override", ["log.model_every_steps=-5", "log.model_every_steps=7"])
def test_model_every_steps_must_be_a_multiple_of_the_checkpoint_cadence(override):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, ["checkpoint.every_steps=5", override])
    assert e.value.key == "log.model_every_steps" and "checkpoint.every_steps=5" in str(e.value)
    assert load_config(RECIPE, ["checkpoint.every_steps=5", "log.model_every_steps=10"]).log.model_every_steps == 10
