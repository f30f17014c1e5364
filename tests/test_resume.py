"""Resumption: bit-exact after SIGKILL, graceful SIGTERM, corrupt checkpoints, config changes, elastic."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import torch

from tests.conftest import BIN, REPO, free_port, run_cli
from trainer.checkpoint import list_checkpoints, read_checkpoint

RECIPE = "configs/dcgan_digits.yaml"
SMALL = ["model.g_width=16", "model.d_width=16", "model.z_dim=16", "train.batch_size=32",
         "log.mlflow_uri=none", "log.every_steps=1", "checkpoint.every_steps=5"]
STEPS = 60


def launch_cmd(nproc: int, data: str, run: str, *extra: str) -> list[str]:
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    if nproc > 1:
        cmd.append("--multi_gpu")
    return cmd + ["--num_processes", str(nproc), "trainer/main.py", "--config", RECIPE,
                  f"data.train={data}", f"run.dir={run}", *SMALL, *extra]


ENV = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")


def run_to_end(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run: str) -> dict[int, dict[str, float]]:
    """Loss terms per step from metrics.jsonl; a step logged again after a resume overrides."""
    out = {}
    for line in open(os.path.join(run, "metrics.jsonl")):
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if k.startswith(("loss/", "d/"))}
    return out


def samples(run: str, tmp) -> np.ndarray:
    out = str(tmp / f"{os.path.basename(run)}-samples.npy")
    r = run_cli("sample", "--run", run, "--n", "16", "--seed", "0", "--out", out)
    assert r.returncode == 0, r.stderr
    return np.load(out)


def signal_tree(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to the launcher and every process below it (torchrun starts workers in new sessions)."""
    import psutil

    tree = psutil.Process(proc.pid)
    for p in [*tree.children(recursive=True), tree]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def start_and_wait_for_step(cmd: list[str], step: int) -> subprocess.Popen:
    """Start a job in its own process group and return once its metrics show `step`."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=REPO, start_new_session=True)
    run = next(a.split("=", 1)[1] for a in cmd if a.startswith("run.dir="))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(os.path.join(run, "metrics.jsonl")) as f:
                if sum(1 for _ in f) >= step:
                    return proc
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"job did not reach step {step} (exit {proc.poll()})")


@pytest.fixture(scope="module")
def reference(digits_dir, tmp_path_factory):
    """An uninterrupted 2-process run of STEPS steps."""
    run = str(tmp_path_factory.mktemp("reference") / "run")
    run_to_end(launch_cmd(2, digits_dir, run, f"train.max_steps={STEPS}"))
    return run


@pytest.mark.slow
def test_resume_is_bitwise_identical(reference, digits_dir, tmp_path):
    run = str(tmp_path / "run")
    cmd = launch_cmd(2, digits_dir, run, f"train.max_steps={STEPS}")
    proc = start_and_wait_for_step(cmd, 20)
    signal_tree(proc, signal.SIGKILL)
    proc.wait(30)
    killed_at = max(losses(run))
    assert 20 <= killed_at < STEPS, "the job must be killed mid-run"
    r = run_to_end(cmd)
    resumed_from = int(re.search(r"resuming from \S+ at step (\d+)", r.stderr).group(1))
    assert 0 < resumed_from <= killed_at
    assert losses(run) == losses(reference), "losses differ after resume"
    ref, got = read_checkpoint(os.path.join(reference, "checkpoints", f"step_{STEPS:08d}")), \
        read_checkpoint(os.path.join(run, "checkpoints", f"step_{STEPS:08d}"))
    for net in ("G", "D", "G_ema"):
        for k, v in ref[net].items():
            assert torch.equal(v, got[net][k]), f"{net}.{k} differs after resume"
    assert np.array_equal(samples(run, tmp_path), samples(reference, tmp_path))


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_step_boundary_and_resume_matches(reference, digits_dir, tmp_path):
    run = str(tmp_path / "run")
    cmd = launch_cmd(2, digits_dir, run, f"train.max_steps={STEPS}")
    proc = start_and_wait_for_step(cmd, 12)
    signal_tree(proc, signal.SIGTERM)  # every process of the job gets it, some twice (forwarded)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "SIGTERM received" in err
    stopped = list_checkpoints(run)[0][0]
    assert 12 <= stopped < STEPS and stopped == max(losses(run)), "checkpoint at the step it stopped"
    run_to_end(cmd)
    assert losses(run) == losses(reference)
    assert np.array_equal(samples(run, tmp_path), samples(reference, tmp_path))


VOTES_PROBE = """
import json, os, sys
from trainer.distributed import StopVotes, init_distributed, shutdown, stop_votes, vote_group
env = init_distributed()
at_once = stop_votes([env.rank == 0, False], env)  # waited for, as the run lock's vote before the loop
votes = StopVotes(env)
assert (votes.group is None) == (os.environ["GANFORGE_BACKEND"] == "gloo")
assert votes.group is vote_group()  # the lock's vote and the loop's share one group
seen = [at_once] + [votes([env.rank == 1 and call == 2, False]) for call in range(6)]
seen.append(votes.settle())
with open(f"{sys.argv[1]}/rank{env.rank}.json", "w") as f:
    json.dump(seen, f)
shutdown()
"""


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:gloo"])
def test_a_vote_cast_by_one_rank_reaches_every_rank_at_the_next_boundary(tmp_path, backend):
    """StopVotes in a real 2-process gloo job: rank 1 votes at the third boundary; both ranks see it
    at the fourth (one boundary later, the same step everywhere), and not again after. Before that,
    rank 0's vote waited for (stop_votes, as the run lock's) reaches both ranks at once. With a job
    group that is not plain gloo (as NCCL's), the votes go through one gloo group of their own."""
    probe = tmp_path / "votes_probe.py"
    probe.write_text(f"import sys; sys.path.insert(0, {REPO!r})\n" + VOTES_PROBE)
    cmd = [os.path.join(BIN, "python"), "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), str(probe), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV | {"GANFORGE_BACKEND": backend},
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    expected = [[True, False]] + [[False, False]] * 3 + [[True, False]] + [[False, False]] * 3
    assert seen == {0: expected, 1: expected}


@pytest.mark.slow
def test_single_process_exits_143_on_sigterm(digits_dir, tmp_path):
    run = str(tmp_path / "run")
    cmd = [os.path.join(BIN, "ganforge"), "train", "--config", RECIPE, f"data.train={digits_dir}",
           f"run.dir={run}", *SMALL, "train.max_steps=100000"]
    proc = start_and_wait_for_step(cmd, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    step = list_checkpoints(run)[0][0]
    assert read_checkpoint(list_checkpoints(run)[0][1])["step"] == step >= 3


def test_truncated_latest_checkpoint_falls_back_with_one_warning(digits_dir, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *SMALL,
            "checkpoint.every_steps=3", "model.g_width=8", "model.d_width=8"]
    assert run_cli(*base, "train.max_steps=6").returncode == 0
    state = run / "checkpoints" / "step_00000006" / "state.pt"
    os.truncate(state, os.path.getsize(state) // 2)
    r = run_cli(*base, "train.max_steps=8")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if " WARNING " in line]
    fallback = [line for line in warnings if "using step_00000003" in line]
    assert len(fallback) == 1 and "step_00000006" in fallback[0]
    assert len(warnings) == 2 and "moved step_00000006 aside" in " ".join(warnings)  # kept, not resumed from
    assert "at step 3" in r.stderr
    assert read_checkpoint(str(run / "checkpoints" / "step_00000008"))["step"] == 8


def test_checkpoint_without_marker_is_not_used(digits_dir, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *SMALL,
            "checkpoint.every_steps=2", "model.g_width=8", "model.d_width=8"]
    assert run_cli(*base, "train.max_steps=4").returncode == 0
    os.remove(run / "checkpoints" / "step_00000004" / "COMMITTED")
    r = run_cli("sample", "--run", str(run), "--n", "4", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 0 and "incomplete checkpoint" in r.stderr


def test_incompatible_config_is_refused_naming_keys_and_nothing_is_overwritten(digits_dir, tmp_path):
    run = tmp_path / "run"
    base = ["train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *SMALL,
            "model.g_width=8", "model.d_width=8"]
    assert run_cli(*base, "train.max_steps=2").returncode == 0
    before = {p: os.path.getmtime(os.path.join(run, p)) for p in ("config.yaml", "checkpoints/step_00000002/state.pt")}
    r = run_cli(*base, "train.max_steps=4", "model.g_width=12", "loss.type=hinge")
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "model.g_width" in line and "loss.type" in line and "step_00000002" in line
    assert {p: os.path.getmtime(os.path.join(run, p)) for p in before} == before
    assert [s for s, _ in list_checkpoints(str(run))] == [2]


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_elastic_resume_continues_the_data_exactly(digits_dir, tmp_path, before, after):
    # float64: summation order (which changes with the world size) then moves weights by ~1e-16
    # relative, far below Adam's eps, so the weights can be held to 1e-9 on any machine.
    bn_free = ["model.norm=none", "precision=fp64", "train.max_steps=10"]
    whole = str(tmp_path / "whole")
    run_to_end(launch_cmd(after, digits_dir, whole, *bn_free))
    split = str(tmp_path / "split")
    run_to_end(launch_cmd(before, digits_dir, split, "model.norm=none", "precision=fp64", "train.max_steps=5"))
    r = run_to_end(launch_cmd(after, digits_dir, split, *bn_free))
    assert "at step 5" in r.stderr and f"world size {after}" in r.stderr
    a = read_checkpoint(os.path.join(whole, "checkpoints", "step_00000010"))
    b = read_checkpoint(os.path.join(split, "checkpoints", "step_00000010"))
    assert a["data"] == b["data"]
    # The first step after the change of world size sees the same data and noise: same losses.
    first = losses(whole)[6], losses(split)[6]
    assert first[1] == pytest.approx(first[0], rel=1e-4, abs=1e-6)
    for net in ("G", "D"):
        for k, v in a[net].items():
            assert (b[net][k] - v).norm() <= 1e-9 * v.norm() + 1e-12, f"{net}.{k}"


LAUNCH_ENV = {k: v for k, v in os.environ.items()
              if not k.startswith(("PET_", "SLURM_", "JOB_COMPLETION_INDEX", "GANFORGE_", "WORLD_SIZE", "RANK",
                                   "LOCAL_RANK", "MASTER_"))} | {"OMP_NUM_THREADS": "1"}


def ganforge_launch(data: str, run: str, *extra: str) -> list[str]:
    """A 2-process `ganforge launch` (torchrun) of the small recipe with 2 loader workers per rank."""
    return [os.path.join(BIN, "ganforge"), "launch", "--config", RECIPE, "--nproc-per-node", "2",
            "--max-restarts", "0", f"data.train={data}", f"run.dir={run}", *SMALL, "data.num_workers=2",
            "checkpoint.every_steps=1000", "train.max_steps=40", *extra]


def sample_raw(run: str, out: str) -> np.ndarray:
    r = run_cli("sample", "--run", run, "--n", "16", "--seed", "0", "--no-ema", "--out", out)
    assert r.returncode == 0, r.stderr
    return np.load(out)


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_checkpoints_and_resumes_bitwise(digits_dir, tmp_path):
    whole = str(tmp_path / "whole")
    r = subprocess.run(ganforge_launch(digits_dir, whole), capture_output=True, text=True, timeout=300,
                       env=LAUNCH_ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    run = str(tmp_path / "run")
    cmd = ganforge_launch(digits_dir, run)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=LAUNCH_ENV,
                            cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 240
    while not (os.path.exists(os.path.join(run, "metrics.jsonl"))
               and sum(1 for _ in open(os.path.join(run, "metrics.jsonl"))) >= 10):
        assert time.monotonic() < deadline and proc.poll() is None, "the job did not reach step 10"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, as a terminal, a container runtime or torchrun does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    found = list_checkpoints(run)
    assert found, "exit 143 promises a checkpoint\n" + err[-3000:]
    assert "DataLoader worker" not in err, err[-3000:]
    stopped = found[0][0]
    assert 10 <= stopped < 40 and stopped == max(losses(run)), "checkpoint at the step it stopped"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=LAUNCH_ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {stopped}" in r.stderr
    assert np.array_equal(sample_raw(run, str(tmp_path / "run.npy")), sample_raw(whole, str(tmp_path / "whole.npy")))


@pytest.mark.slow
def caught(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("no error")


def test_a_connection_broken_while_taking_a_batch_counts_as_a_lost_worker():
    """A worker killed while it hands a batch's shared memory over resets that socket instead of
    raising the DataLoader's own error (as the test below sometimes sees): both are a lost worker
    (the step may run again); the same errors raised anywhere else are not."""
    from trainer.preemption import lost_worker

    def _try_get_data():  # the DataLoader's frame that receives a batch from a worker
        raise ConnectionResetError(104, "Connection reset by peer")

    def elsewhere():
        raise ConnectionResetError(104, "Connection reset by peer")

    def dataloader_error():
        raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed.")

    assert lost_worker(caught(_try_get_data)) and lost_worker(caught(dataloader_error))
    assert not lost_worker(caught(elsewhere))
    assert not lost_worker(RuntimeError("CUDA out of memory"))


def test_loader_workers_lost_during_a_stop_do_not_cost_the_checkpoint(digits_dir, tmp_path):
    import psutil

    base = [os.path.join(BIN, "ganforge"), "train", "--config", RECIPE, f"data.train={digits_dir}", *SMALL,
            "data.num_workers=2", "checkpoint.every_steps=1000", "train.max_steps=40"]
    whole = str(tmp_path / "whole")
    run_to_end([*base, f"run.dir={whole}"])
    run = str(tmp_path / "run")
    cmd = [*base, f"run.dir={run}"]
    proc = start_and_wait_for_step(cmd, 5)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    for w in workers:  # the workers stall: the trainer drains what they prefetched and waits for more
        w.send_signal(signal.SIGSTOP)
    seen, still = -1, 0.0
    while still < 2.0:
        time.sleep(0.25)
        now = len(losses(run))
        seen, still = now, (still + 0.25 if now == seen else 0.0)
    proc.send_signal(signal.SIGTERM)  # a stop is requested while the step waits for its batch ...
    time.sleep(0.5)
    for w in workers:  # ... and the workers die before delivering it
        w.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "runs again on new loader workers" in err
    stopped = list_checkpoints(run)[0][0]
    assert stopped == seen + 1 == max(losses(run)), "checkpoint at the boundary after the step that ran again"
    run_to_end(cmd)
    assert np.array_equal(sample_raw(run, str(tmp_path / "run.npy")), sample_raw(whole, str(tmp_path / "whole.npy")))
