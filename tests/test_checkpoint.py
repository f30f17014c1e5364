"""Checkpoint retention, rollback and the fallback past damaged checkpoints (CheckpointManager)."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch

from tests.conftest import run_cli
from trainer.checkpoint import (
    CheckpointManager,
    list_checkpoints,
    load_latest,
    read_checkpoint,
    write_checkpoint,
)

RECIPE = "configs/dcgan_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=32", "log.mlflow_uri=none",
        "log.every_steps=1"]


def state(step: int) -> dict:
    return {"step": step, "w": torch.full((4,), float(step))}


def damage(run: str, step: int) -> None:
    path = os.path.join(run, "checkpoints", f"step_{step:08d}", "state.pt")
    os.truncate(path, os.path.getsize(path) // 2)


def steps(run: str) -> list[int]:
    return [s for s, _ in list_checkpoints(run)]


def test_retention_counts_only_valid_checkpoints(tmp_path):
    run = str(tmp_path)
    write_checkpoint(run, 6, state(6))
    damage(run, 6)  # the newest is damaged: the run starts again and saves step 3
    ckpt = CheckpointManager(run, keep=1)
    ckpt.save(3, state(3), blocking=True)
    assert 3 in steps(run), "the only valid checkpoint was deleted"
    assert load_latest(run, warn=False)[1]["step"] == 3


def test_retention_keeps_the_checkpoint_the_run_resumed_from(tmp_path):
    run = str(tmp_path)
    resumed = write_checkpoint(run, 3, state(3))
    ckpt = CheckpointManager(run, keep=1, resumed_from=resumed)
    ckpt.save(4, state(4), blocking=True)
    ckpt.save(5, state(5), blocking=True)
    assert steps(run) == [5, 3]


def test_retention_keeps_the_newest_valid_ones_plus_milestones(tmp_path):
    run = str(tmp_path)
    ckpt = CheckpointManager(run, keep=2, milestone_every=4)
    for step in range(1, 10):
        ckpt.save(step, state(step), blocking=True)
    assert steps(run) == [9, 8, 7, 4]


def warnings_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]


def test_fallback_warning_says_when_no_checkpoint_is_left(tmp_path, caplog):
    run = str(tmp_path)
    write_checkpoint(run, 2, state(2))
    damage(run, 2)
    assert load_latest(run) is None
    err = "\n".join(warnings_logged(caplog))
    assert "step_00000002" in err and "no valid checkpoint is left" in err and "using an earlier" not in err


def test_fallback_warning_names_the_checkpoint_used(tmp_path, caplog):
    run = str(tmp_path)
    write_checkpoint(run, 2, state(2))
    write_checkpoint(run, 4, state(4))
    damage(run, 4)
    assert load_latest(run)[1]["step"] == 2
    err = "\n".join(warnings_logged(caplog))
    assert len(err.strip().splitlines()) == 1 and "step_00000004" in err and "using step_00000002" in err


def test_rollback_moves_the_abandoned_branch_aside(digits_dir, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *TINY,
            "checkpoint.every_steps=2", "checkpoint.keep=5"]
    assert run_cli(*base, "train.max_steps=6").returncode == 0
    old6 = read_checkpoint(str(run / "checkpoints" / "step_00000006"))
    r = run_cli(*base, "train.max_steps=4", f"checkpoint.resume={run / 'checkpoints' / 'step_00000002'}")
    assert r.returncode == 0, r.stderr
    moved = re.search(r"moved step_00000004, step_00000006 aside to (\S+)", r.stdout + r.stderr)
    assert moved, r.stdout + r.stderr
    aside = moved.group(1).rstrip(";:,.")
    assert sorted(os.listdir(aside)) == ["step_00000004", "step_00000006"]
    key = next(iter(old6["G"]))
    assert torch.equal(read_checkpoint(os.path.join(aside, "step_00000006"))["G"][key], old6["G"][key])
    assert steps(str(run)) == [4, 2]
    r = run_cli(*base, "train.max_steps=5")
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr and "at step 4" in r.stderr, "resume=latest went back to the abandoned branch"


DIE_BETWEEN_RENAMES = """
import os, sys
from trainer.checkpoint import read_checkpoint, write_checkpoint
run, path = sys.argv[1], sys.argv[2]
state = read_checkpoint(path)
rename = os.rename
def rename_then_die(src, dst):
    if os.path.basename(src).startswith(".tmp-step_"):
        os._exit(9)  # the process dies as the new copy is about to be renamed into place
    rename(src, dst)
os.rename = rename_then_die
write_checkpoint(run, state["step"], state)
"""


def test_a_death_while_saving_a_step_again_keeps_a_valid_copy(digits_dir, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    run = tmp_path / "run"
    base = ["train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *TINY,
            "checkpoint.every_steps=2"]
    assert run_cli(*base, "train.max_steps=4").returncode == 0
    step4 = str(run / "checkpoints" / "step_00000004")
    r = subprocess.run([sys.executable, "-c", DIE_BETWEEN_RENAMES, str(run), step4], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    r = run_cli(*base, "train.max_steps=6")
    assert r.returncode == 0, r.stderr
    assert "at step 4" in r.stderr, "the checkpoint being saved again was lost"
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".")], "leftovers"


def test_a_full_disk_is_reported_at_the_next_step_and_nothing_is_lost(digits_dir, tmp_path):
    import subprocess

    measure = tmp_path / "measure"
    common = ["train", "--config", RECIPE, f"data.train={digits_dir}", *TINY, "checkpoint.keep=3"]
    assert run_cli(*common, f"run.dir={measure}", "train.max_steps=1", "checkpoint.every_steps=1").returncode == 0
    one = sum(f.stat().st_size for f in (measure / "checkpoints" / "step_00000001").iterdir())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    size = -(-(one * 3 // 2) // 4096) * 4096  # room for one checkpoint and half of the next
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(run / "checkpoints")],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        r = run_cli(*common, f"run.dir={run}", "train.max_steps=40", "checkpoint.every_steps=4")
        assert r.returncode == 1, r.stderr[-3000:]
        line = r.stderr.strip().splitlines()[-1]
        assert "step_00000008" in line and "No space left on device" in line, line
        last = max(json.loads(x)["step"] for x in open(run / "metrics.jsonl"))
        assert last < 12, f"the failed save of step 8 was reported only at step {last}"
        assert steps(str(run)) == [4] and read_checkpoint(str(run / "checkpoints" / "step_00000004"))["step"] == 4
        assert os.listdir(run / "checkpoints") == ["step_00000004"], "the partial save was left behind"
    finally:
        subprocess.run(["umount", str(run / "checkpoints")], check=True)


def test_start_deletes_partial_saves_and_keeps_finished_ones(tmp_path):
    from trainer.checkpoint import recover_checkpoints

    run = str(tmp_path)
    d = tmp_path / "checkpoints"
    write_checkpoint(run, 2, state(2))
    partial = d / ".tmp-step_00000004-999999"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"half a checkpoint")
    os.rename(write_checkpoint(run, 6, state(6)), d / ".tmp-step_00000006-999999")  # died just before its rename
    recover_checkpoints(run)
    assert sorted(os.listdir(d)) == ["step_00000002", "step_00000006"]
    assert read_checkpoint(str(d / "step_00000006"))["step"] == 6


def test_a_second_job_on_the_same_run_dir_is_refused_naming_the_holder(digits_dir, tmp_path):
    import signal
    import socket
    import subprocess

    from tests.conftest import BIN, REPO

    run = tmp_path / "run"
    base = ["train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *TINY,
            "checkpoint.every_steps=2"]
    first = subprocess.Popen([os.path.join(BIN, "ganforge"), *base, "train.max_steps=100000"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(str(run)):
            assert time.monotonic() < deadline and first.poll() is None, "the first job did not start"
            time.sleep(0.1)
        r = run_cli(*base, "train.max_steps=4")
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and socket.gethostname() in lines[0], r.stderr
        assert first.poll() is None, "the first job must go on"
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock: its file stays behind
        first.wait(30)
    r = run_cli(*base, "train.max_steps=4", "checkpoint.resume=none")
    assert r.returncode == 0, r.stderr
    assert "taking over the lock" in r.stderr and f"pid {first.pid}" in r.stderr
    assert not (run / "LOCK").exists(), "released at exit"
