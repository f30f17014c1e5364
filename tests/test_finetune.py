"""checkpoint.init_from: a new run starts from another run's network weights, with fresh optimisers."""

from __future__ import annotations

import torch

from tests.conftest import run_cli
from trainer.checkpoint import list_checkpoints, read_checkpoint

RECIPE = "configs/dcgan_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16", "log.mlflow_uri=none",
        "train.threads=1"]


def newest(run) -> dict:
    return read_checkpoint(list_checkpoints(str(run))[0][1])


def test_init_from_loads_weights_only_and_a_resumed_run_keeps_its_own(digits_dir, tmp_path):
    source, tuned = tmp_path / "source", tmp_path / "tuned"
    base = ["train", "--config", RECIPE, f"data.train={digits_dir}", *TINY]
    assert run_cli(*base, f"run.dir={source}", "train.max_steps=6", env={"WORLD_SIZE": "1"}).returncode == 0
    before = newest(source)
    # One step at an lr so small that Adam's first step (about lr per weight) cannot move anything visibly.
    r = run_cli(*base, f"run.dir={tuned}", "train.max_steps=1", f"checkpoint.init_from={source}",
                "train.lr_g=1e-12", "train.lr_d=1e-12", env={"WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"initialised the networks from {source}" in r.stderr
    after = newest(tuned)
    assert after["step"] == 1 and after["nimg"] == 16 and after["data"]["consumed"] == 16  # counters start at 0
    for name in ("G", "D"):
        assert before[name].keys() == after[name].keys()
        for k, v in before[name].items():
            if v.is_floating_point() and "running" not in k:  # BN statistics do move with the new batch
                assert torch.allclose(after[name][k], v, atol=1e-9, rtol=0), (name, k)
        steps = {int(s["step"]) for s in after[f"opt_{name}"]["state"].values()}
        assert steps == {1}  # a fresh optimiser: one step taken, none of the source's 6
    fresh = tmp_path / "fresh"
    assert run_cli(*base, f"run.dir={fresh}", "train.max_steps=1", "train.lr_g=1e-12", "train.lr_d=1e-12",
                   env={"WORLD_SIZE": "1"}).returncode == 0
    assert not torch.allclose(newest(fresh)["G"]["net.0.weight"], before["G"]["net.0.weight"])  # the check can fail

    # Once the run has checkpoints of its own, it resumes from them, not from init_from.
    r = run_cli(*base, f"run.dir={tuned}", "train.max_steps=2", f"checkpoint.init_from={source}",
                env={"WORLD_SIZE": "1"})
    assert r.returncode == 0 and "resuming from" in r.stderr and "initialised" not in r.stderr, r.stderr[-2000:]


def test_init_from_a_different_architecture_or_nothing_is_one_line(digits_dir, tmp_path):
    source = tmp_path / "source"
    base = ["train", "--config", RECIPE, f"data.train={digits_dir}", *TINY]
    assert run_cli(*base, f"run.dir={source}", "train.max_steps=2", env={"WORLD_SIZE": "1"}).returncode == 0
    r = run_cli(*base, f"run.dir={tmp_path / 'wider'}", "train.max_steps=1", "model.g_width=16",
                f"checkpoint.init_from={source}", env={"WORLD_SIZE": "1"})
    assert r.returncode == 1, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("ganforge:")]
    assert "G: a different architecture" in line and "net.0.weight" in line and "step_00000002" in line
    assert not list_checkpoints(str(tmp_path / "wider"))
    r = run_cli(*base, f"run.dir={tmp_path / 'x'}", f"checkpoint.init_from={tmp_path / 'nothing'}")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "checkpoint.init_from" in r.stderr


SG2 = ["model.g_width=16", "model.d_width=16", "model.channel_base=256", "model.z_dim=32", "model.w_dim=32",
       "train.batch_size=8", "log.mlflow_uri=none", "train.threads=1", "loss.r1_every=2", "loss.pl_every=2",
       "checkpoint.every_steps=100"]


def frozen_and_trained(source: dict, tuned: dict) -> tuple[set[str], set[str]]:
    """Names of D's floating-point tensors left exactly as in `source`, and of those that moved."""
    same = {k for k, v in source["D"].items() if v.is_floating_point() and torch.equal(tuned["D"][k], v)}
    return same, {k for k, v in source["D"].items() if v.is_floating_point()} - same


def test_freeze_d_keeps_the_first_d_blocks_fixed_while_the_rest_trains(digits_dir, tmp_path):
    from tests.conftest import accelerate_cpu

    source = tmp_path / "source"
    base = ["--config", "configs/stylegan2_digits.yaml", f"data.train={digits_dir}", *SG2]
    assert run_cli("train", *base, f"run.dir={source}", "train.max_steps=2", env={"WORLD_SIZE": "1"}).returncode == 0
    before = newest(source)
    r = run_cli("train", *base, f"run.dir={tmp_path / 'one'}", "train.max_steps=4", f"checkpoint.init_from={source}",
                "model.freeze_d=1", env={"WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    same, moved = frozen_and_trained(before, newest(tmp_path / "one"))
    assert {k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks") else "") for k in same} \
        == {"from_rgb", "blocks.0"}  # fromRGB and the 32x32 block, every tensor of them, and nothing else
    assert moved and not any(k.startswith(("from_rgb", "blocks.0.")) for k in moved)
    # Two processes under DDP: the frozen tensors are outside the gradient reduction and stay fixed too.
    r = accelerate_cpu(2, *base, f"run.dir={tmp_path / 'two'}", "train.max_steps=4", f"checkpoint.init_from={source}",
                       "model.freeze_d=2")
    assert r.returncode == 0, r.stderr[-3000:]
    same, moved = frozen_and_trained(before, newest(tmp_path / "two"))
    assert {k for k in same if k.startswith(("from_rgb", "blocks.0.", "blocks.1."))} == \
        {k for k in before["D"] if k.startswith(("from_rgb", "blocks.0.", "blocks.1.")) and before["D"][k].is_floating_point()}
    assert moved and not any(k.startswith(("from_rgb", "blocks.0.", "blocks.1.")) for k in moved)
    r = run_cli("train", *base, f"run.dir={tmp_path / 'x'}", "model.freeze_d=4")
    assert r.returncode == 2 and "model.freeze_d" in r.stderr and "0..3" in r.stderr
