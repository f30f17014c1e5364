"""strategy=deepspeed: ZeRO-1/2 trains exactly like DDP, resumes exactly, and refuses what it cannot do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli
from trainer.checkpoint import read_checkpoint
from trainer.config import ConfigError
from trainer.families import load_config

RECIPE = "configs/wgan_gp_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16", "log.mlflow_uri=none",
        "log.every_steps=1", "train.threads=1"]
ENV = {"OMP_NUM_THREADS": "1"}


def launch(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    """`ganforge launch --nproc-per-node 2 ...` on CPU (torchrun, gloo), as a user runs it."""
    r = run_cli("launch", "--nproc-per-node", "2", "--device", "cpu", *args, env=ENV, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def weights(run: str, step: int) -> dict:
    return read_checkpoint(os.path.join(run, "checkpoints", f"step_{step:08d}"))


def losses(run: str) -> dict[int, dict[str, float]]:
    out = {}
    for line in open(os.path.join(run, "metrics.jsonl")):
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if k.startswith(("loss/", "d/", "grad_norm/"))}
    return out


def assert_same_networks(a: dict, b: dict, rel: float) -> None:
    for net in ("G", "D", "G_ema"):
        for k, v in a[net].items():
            if v.is_floating_point():
                assert (b[net][k] - v).norm() <= rel * v.norm() + 1e-12, f"{net}.{k}"
            else:
                assert torch.equal(b[net][k], v), f"{net}.{k}"


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,key,words", [
    (["deepspeed.zero_stage=3"], "deepspeed.zero_stage", "whole parameters"),
    (["deepspeed.zero_stage=0"], "deepspeed.zero_stage", "strategy=ddp"),
    (["deepspeed.zero_stage=two"], "deepspeed.zero_stage", "expected int"),
    (["deepspeed.bucket_size=0"], "deepspeed.bucket_size", "> 0"),
    (["deepspeed.offload=true"], "deepspeed.offload", "unknown key"),
    (["train.compile=true"], "train.compile", "deepspeed"),
    (["strategy=zero"], "strategy", "ddp, deepspeed"),
])
def test_bad_deepspeed_settings_are_refused_naming_the_key(digits_dir, overrides, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [f"data.train={digits_dir}", "strategy=deepspeed", *overrides])
    assert e.value.key == key and words in str(e.value)


def test_translation_models_are_refused_under_deepspeed(digits_dir):
    with pytest.raises(ConfigError) as e:
        load_config("configs/pix2pix_edges.yaml", [f"data.train={digits_dir}", "strategy=deepspeed"])
    assert e.value.key == "strategy"


def test_missing_deepspeed_package_is_one_clear_config_error(digits_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [f"data.train={digits_dir}", "strategy=deepspeed"])
    assert e.value.key == "strategy" and "not installed" in str(e.value)


def test_launch_exits_2_on_zero_stage_3_before_any_process_starts(digits_dir, tmp_path):
    r = run_cli("launch", "--nproc-per-node", "2", "--config", RECIPE, f"data.train={digits_dir}",
                f"run.dir={tmp_path}/r", "strategy=deepspeed", "deepspeed.zero_stage=3")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "deepspeed.zero_stage" in r.stderr
    assert not os.path.exists(tmp_path / "r")


def test_a_checkpoint_of_the_other_strategy_is_refused_naming_strategy():
    from trainer.checkpoint import CheckpointError
    from trainer.config import Config, to_dict
    from trainer.core import check_compatible

    ddp, zero = to_dict(Config()), to_dict(Config(strategy="deepspeed"))
    with pytest.raises(CheckpointError, match="strategy \\('ddp' in checkpoint, 'deepspeed' now\\)"):
        check_compatible(ddp, zero, "step_00000005")
    check_compatible(zero, zero, "step_00000005")


def test_generated_deepspeed_config_makes_every_training_setting_explicit(digits_dir):
    from trainer.strategies.deepspeed import deepspeed_config

    cfg = load_config(RECIPE, [f"data.train={digits_dir}", "strategy=deepspeed", "deepspeed.zero_stage=1"])
    conf = deepspeed_config(cfg, "fp32", world_size=2, numel=1000)
    assert conf["gradient_clipping"] == 0.0  # DeepSpeed's own default (1.0) would clip
    assert conf["zero_optimization"]["reduce_bucket_size"] == 1024  # the network's size, aligned
    assert conf["zero_optimization"]["stage"] == 1 and conf["zero_optimization"]["elastic_checkpoint"]
    assert conf["train_batch_size"] == 64 and conf["train_micro_batch_size_per_gpu"] == 32
    assert "torch_autocast" not in conf and not conf["bf16"]["enabled"] and not conf["fp16"]["enabled"]
    cfg.train.grad_clip, cfg.train.accumulate = 2.5, 2
    conf = deepspeed_config(cfg, "bf16", world_size=2)
    assert conf["gradient_clipping"] == 2.5 and conf["managed_gradient_accumulation"] is False
    assert conf["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}


def test_fp16_loss_scale_backs_off_on_overflow_and_grows_after_an_interval():
    from trainer.strategies.deepspeed import LossScale

    s = LossScale(init_scale=8.0, growth_interval=2)
    s.update(False)
    assert s.scale == 4.0
    s.update(True)
    s.update(True)
    assert s.scale == 8.0
    t = LossScale()
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.growth_tracker) == (8.0, 0)
    assert set(s.state_dict()) == {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}


# -- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero2_run(digits_dir, tmp_path_factory) -> str:
    """An uninterrupted 2-process ZeRO-2 run of 10 steps, checkpointing every 5."""
    run = str(tmp_path_factory.mktemp("zero2") / "run")
    launch("--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *TINY, "strategy=deepspeed",
           "deepspeed.zero_stage=2", "train.max_steps=10", "checkpoint.every_steps=5")
    return run


@pytest.mark.slow
def test_zero2_trains_the_same_weights_as_ddp(zero2_run, digits_dir, tmp_path):
    ddp = str(tmp_path / "ddp")
    launch("--config", RECIPE, f"data.train={digits_dir}", f"run.dir={ddp}", *TINY, "train.max_steps=10",
           "checkpoint.every_steps=5")
    a, b = weights(ddp, 10), weights(zero2_run, 10)
    assert b["strategy"] == "deepspeed" and len(b["opt_G"]) == 2 == b["world_size"]  # one partition per rank
    assert_same_networks(a, b, rel=1e-5)
    saved = json.load(open(os.path.join(zero2_run, "deepspeed_D.json")))
    assert saved["zero_optimization"]["stage"] == 2 and saved["gradient_clipping"] == 0.0


@pytest.mark.slow
def test_zero1_with_batch_norm_and_weight_clipping_matches_ddp(digits_dir, tmp_path):
    # BN statistics are averaged over ranks after each step, as under DDP; the WGAN clamp also
    # reaches the optimiser's fp32 master copy.
    common = ["--config", "configs/wgan_clip_digits.yaml", f"data.train={digits_dir}", *TINY,
              "train.max_steps=3", "checkpoint.every_steps=3", "train.grad_clip=0.01"]
    launch(*common, f"run.dir={tmp_path}/ddp")
    launch(*common, f"run.dir={tmp_path}/zero1", "strategy=deepspeed", "deepspeed.zero_stage=1")
    a, b = weights(str(tmp_path / "ddp"), 3), weights(str(tmp_path / "zero1"), 3)
    assert any("running_mean" in k for k in a["G"])
    assert_same_networks(a, b, rel=1e-5)


@pytest.mark.slow
def test_resume_from_a_checkpoint_gives_the_uninterrupted_weights(zero2_run, digits_dir, tmp_path):
    # A run stopped at step 5 holds exactly this checkpoint; the same command resumes it.
    run = tmp_path / "run"
    shutil.copytree(os.path.join(zero2_run, "checkpoints", "step_00000005"), run / "checkpoints" / "step_00000005")
    r = launch("--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *TINY, "strategy=deepspeed",
               "checkpoint.every_steps=5", "train.max_steps=10")
    assert "resuming from" in r.stderr and "at step 5" in r.stderr
    a, b = weights(zero2_run, 10), weights(str(run), 10)
    assert_same_networks(a, b, rel=0.0)
    for net in ("opt_G", "opt_D"):
        for ra, rb in zip(a[net], b[net], strict=True):
            for x, y in zip(ra["single_partition_of_fp32_groups"], rb["single_partition_of_fp32_groups"], strict=True):
                assert torch.equal(x, y), f"{net}: fp32 master weights differ after resume"
            for key, x in ra["base_optimizer_state"][0].items():
                assert torch.equal(x, rb["base_optimizer_state"][0][key]), f"{net}: {key} differs after resume"
    assert losses(str(run))[10] == losses(zero2_run)[10]


@pytest.mark.slow
def test_resume_on_one_process_repartitions_the_optimizer_state(zero2_run, digits_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(os.path.join(zero2_run, "checkpoints", "step_00000005"), run / "checkpoints" / "step_00000005")
    r = run_cli("train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *TINY,
                "strategy=deepspeed", "train.max_steps=7", env=dict(ENV, WORLD_SIZE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "at step 5; world size 1" in r.stderr
    state = weights(str(run), 7)
    assert state["world_size"] == 1 and len(state["opt_D"]) == 1
    assert state["data"]["consumed"] == 7 * 5 * 16
    # One rank now holds the whole optimiser state: both partitions of the checkpoint, in order.
    saved = weights(zero2_run, 5)["opt_D"]
    assert state["opt_D"][0]["single_partition_of_fp32_groups"][0].numel() == sum(
        p["single_partition_of_fp32_groups"][0].numel() for p in saved)


@pytest.mark.slow
def test_acceptance_launch_with_zero2_then_sample(tmp_path):
    """The documented command, run from a project directory holding data/digits."""
    assert run_cli("data", "make-shards", "--source", "digits", "--out", str(tmp_path / "data" / "digits")).returncode == 0
    shutil.copytree(os.path.join(REPO, "configs"), tmp_path / "configs")
    launch("--config", "configs/wgan_gp_digits.yaml", "strategy=deepspeed", "deepspeed.zero_stage=2",
           "train.max_steps=10", "run.dir=R", cwd=str(tmp_path))
    assert os.path.exists(tmp_path / "R" / "deepspeed_G.json")
    r = run_cli("sample", "--run", "R", "--n", "16", "--seed", "0", "--out", "x.png", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    r = run_cli("sample", "--run", "R", "--n", "4", "--seed", "0", "--out", "x.npy", cwd=str(tmp_path))
    assert r.returncode == 0 and np.load(tmp_path / "x.npy").shape == (4, 1, 32, 32)


@pytest.mark.slow
def test_killed_mid_run_the_same_command_resumes_to_the_uninterrupted_weights(zero2_run, digits_dir, tmp_path):
    """SIGKILL every process of a running ZeRO-2 job, then run the same `ganforge launch` command."""
    import signal

    from tests.conftest import BIN
    from tests.test_resume import signal_tree, start_and_wait_for_step

    run = tmp_path / "run"
    cmd = [os.path.join(BIN, "ganforge"), "launch", "--nproc-per-node", "2", "--device", "cpu", "--config", RECIPE,
           f"data.train={digits_dir}", f"run.dir={run}", *TINY, "strategy=deepspeed", "deepspeed.zero_stage=2",
           "train.max_steps=10", "checkpoint.every_steps=5"]
    proc = start_and_wait_for_step(cmd, 6)
    signal_tree(proc, signal.SIGKILL)
    proc.wait(30)
    assert not (run / "checkpoints" / "step_00000010").exists(), "the job must be killed mid-run"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, **ENV), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_networks(weights(zero2_run, 10), weights(str(run), 10), rel=0.0)
    assert losses(str(run))[10] == losses(zero2_run)[10]
