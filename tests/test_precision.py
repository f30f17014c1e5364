"""Which precision a run uses, and float64 staying float64."""

from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError
from trainer.data import to_unit_range
from trainer.families import load_config
from trainer.main import prepare
from trainer.precision import check_launcher_precision, resolve_precision, upcast

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
RECIPE = "configs/dcgan_digits.yaml"


def test_auto_follows_the_launchers_mixed_precision_unless_the_config_names_one(monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert (resolve_precision("auto", CPU), resolve_precision("auto", GPU)) == ("fp32", "bf16")
    for launcher in ("bf16", "fp16"):  # accelerate launch --mixed_precision bf16|fp16
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
        assert resolve_precision("auto", CPU) == resolve_precision("auto", GPU) == launcher
        for explicit in ("fp32", "bf16", "fp16", "fp64"):
            assert resolve_precision(explicit, GPU) == explicit
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # the device's default
    assert (resolve_precision("auto", CPU), resolve_precision("auto", GPU)) == ("fp32", "bf16")


def test_a_launcher_precision_ganforge_does_not_train_in_stops_auto_naming_the_key(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    cfg = load_config(RECIPE, ["data.train=unused"])  # the config alone is fine: the launcher is checked at startup
    with pytest.raises(ConfigError) as e:
        prepare(RECIPE, ["data.train=unused"])
    assert e.value.key == "precision" and "fp8" in str(e.value)
    with pytest.raises(ConfigError, match="precision"):
        check_launcher_precision(cfg.precision, {"ACCELERATE_MIXED_PRECISION": "fp8"})
    check_launcher_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "fp8"})
    check_launcher_precision("auto", {"ACCELERATE_MIXED_PRECISION": "fp16"})


def test_fp64_is_a_precision_without_deepspeed_or_evaluation_during_training(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert load_config(RECIPE, ["data.train=unused", "precision=fp64"]).precision == "fp64"
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, ["data.train=unused", "precision=fp64", "strategy=deepspeed"])
    assert e.value.key == "precision"
    with pytest.raises(ConfigError) as e:  # evaluation is float32; an fp64 run's checkpoints are evaluated afterwards
        load_config(RECIPE, ["data.train=unused", "precision=fp64", "eval.every_steps=10"])
    assert e.value.key == "eval.every_steps"


def test_upcast_widens_half_precision_and_never_narrows_float64():
    for dtype, widened in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                           (torch.float32, torch.float32), (torch.float64, torch.float64)):
        assert upcast(torch.ones(2, dtype=dtype)).dtype == widened
    x = torch.ones(2)
    assert upcast(x) is x  # float32 stays the same tensor: fp32 runs compute exactly as before


def test_real_batches_take_the_default_dtype():
    images = torch.tensor([[0, 255, 51]], dtype=torch.uint8)
    assert to_unit_range(images.clone()).dtype == torch.float32
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = to_unit_range(images.clone())
    finally:
        torch.set_default_dtype(before)
    assert x.dtype == torch.float64 and x.tolist() == [[-1.0, 1.0, 51 / 127.5 - 1]]
