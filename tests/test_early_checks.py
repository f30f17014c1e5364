"""Settings that used to fail late (hours into a run, or with other ranks hanging) stop before
anything starts with exit 2 and one line; a data volume that is not there yet is retryable."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from trainer.config import ConfigError
from trainer.families import load_config

RECIPE = "configs/dcgan_digits.yaml"


@pytest.mark.parametrize("override,key", [
    ("eval.metrics=fid,fjd", "eval.metrics"),
    ("eval.metrics=,", "eval.metrics"),
    ("eval.n=0", "eval.n"),
    ("eval.every_steps=-1", "eval.every_steps"),
    ("eval.features=resnet", "eval.features"),
    ("train.lr_g=nan", "train.lr_g"),
    ("train.lr_d=.inf", "train.lr_d"),
    ("train.max_minutes=inf", "train.max_minutes"),
    ("log.prometheus_port=70000", "log.prometheus_port"),
    ("log.prometheus_port=-1", "log.prometheus_port"),
])
def test_a_setting_that_would_fail_later_is_refused_naming_its_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, ["data.train=unused", override])
    assert e.value.key == key


def test_missing_inception_weights_are_refused_when_training_evaluates():
    with pytest.raises(ConfigError, match="eval.inception_weights"):
        load_config(RECIPE, ["data.train=unused", "eval.every_steps=100", "eval.inception_weights=/no/such.pth"])


def test_bad_eval_settings_and_an_unwritable_run_dir_exit_2_before_anything_is_written(digits_dir, tmp_path):
    r = run_cli("train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={tmp_path}/r",
                "eval.every_steps=10", "eval.metrics=fid,fjd")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "eval.metrics" in r.stderr
    assert not (tmp_path / "r").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = run_cli("train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={blocker}/run")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "run.dir" in r.stderr


def test_a_data_volume_that_is_not_there_yet_is_retryable(tmp_path):
    r = run_cli("train", "--config", RECIPE, f"data.train={tmp_path}/not_mounted", f"run.dir={tmp_path}/r")
    assert r.returncode == 1, r.stderr  # a Job retries exit 1; exit 2 would fail it for good
    assert r.stderr.strip().count("\n") == 0 and "not_mounted" in r.stderr and "retried" in r.stderr
