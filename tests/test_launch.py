"""`ganforge launch`: the command it builds, the checks before it starts, and real torchrun jobs.

The multi-node tests run two torchrun agents on 127.0.0.1 as two "nodes" that meet through
the c10d rendezvous, as they would on two machines (see docs/launch.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from launcher.cluster import detect_cluster, first_host
from tests.conftest import BIN, REPO, free_port, run_cli

RECIPE = "configs/dcgan_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16", "log.mlflow_uri=none"]
# No cluster variables may leak in from the machine running the tests.
CLEAN = {k: v for k, v in os.environ.items()
         if not k.startswith(("PET_", "SLURM_", "JOB_COMPLETION_INDEX", "GANFORGE_", "OMP_NUM_THREADS",
                              "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_"))}


def launch_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "ganforge"), "launch", *args], capture_output=True, text=True,
                          timeout=timeout, env={**CLEAN, **(env or {})}, cwd=REPO)


def command_line(stdout: str) -> str:
    """The printed command: the line after the '# ganforge launch: ...' summary."""
    lines = stdout.splitlines()
    return lines[[i for i, line in enumerate(lines) if line.startswith("# ganforge launch")][0] + 1]


def newest_checkpoint(run_dir: str) -> tuple[str, dict]:
    from trainer.checkpoint import load_latest

    found = load_latest(run_dir)
    assert found, f"no valid checkpoint in {run_dir}"
    return found


# -- the command ------------------------------------------------------------------------------

def test_dry_run_prints_torchrun_with_c10d_and_a_run_id_from_run_name(digits_dir, tmp_path):
    run = tmp_path / "never"
    r = launch_cli("--config", RECIPE, "--nproc-per-node", "2", "--dry-run", f"data.train={digits_dir}",
                   f"run.dir={run}")
    assert r.returncode == 0, r.stderr
    line = command_line(r.stdout)
    assert "torchrun" in line and "--rdzv-backend c10d" in line
    assert "--nproc-per-node 2" in line and "--nnodes 1" in line
    assert f"--max-restarts {3}" in line and "--monitor-interval 1" in line
    assert "OMP_NUM_THREADS=" in line and "ACCELERATE_USE_CPU=1" in line
    assert line.endswith(f"trainer/main.py --config {RECIPE} data.train={digits_dir} run.dir={run}")
    run_id = re.search(r"--rdzv-id (\S+)", line).group(1)
    assert run_id.startswith("ganforge-dcgan_digits-")
    again = command_line(launch_cli("--config", RECIPE, "--dry-run", f"data.train={digits_dir}").stdout)
    other = command_line(launch_cli("--config", RECIPE, "--dry-run", f"data.train={digits_dir}",
                                    "run.name=other").stdout)
    assert f"--rdzv-id {run_id} " in again, "the same run must meet under the same id after a restart"
    assert f"--rdzv-id {run_id} " not in other
    assert not run.exists(), "--dry-run starts nothing"


def test_bad_config_exits_2_before_any_process_starts(digits_dir):
    r = launch_cli("--config", RECIPE, f"data.train={digits_dir}", "train.max_stepz=3")
    assert r.returncode == 2
    assert "train.max_stepz" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "torchrun" not in r.stdout


def test_global_batch_must_divide_every_world_size_of_an_elastic_job(digits_dir):
    r = launch_cli("--config", RECIPE, "--dry-run", "--nnodes", "2:3", "--nproc-per-node", "2",
                   "--rdzv-endpoint", "node0:29400", f"data.train={digits_dir}", "train.batch_size=16")
    assert r.returncode == 2 and "train.batch_size" in r.stderr and "6" in r.stderr


def test_several_nodes_need_a_rendezvous_endpoint(digits_dir):
    r = launch_cli("--config", RECIPE, "--dry-run", "--nnodes", "2", f"data.train={digits_dir}")
    assert r.returncode == 2 and "--rdzv-endpoint" in r.stderr


def test_indexed_job_pod_finds_node_0_through_the_headless_service(digits_dir):
    env = {"JOB_COMPLETION_INDEX": "2", "JOB_NAME": "gan-train", "GANFORGE_RDZV_SERVICE": "gan-train",
           "GANFORGE_NNODES": "4"}
    r = launch_cli("--config", RECIPE, "--dry-run", f"data.train={digits_dir}", env=env)
    assert r.returncode == 0, r.stderr
    line = command_line(r.stdout)
    assert "--nnodes 4" in line and "--rdzv-endpoint gan-train-0.gan-train:29400" in line
    assert "--rdzv-conf is_host=0" in line, "only pod 0 may host the c10d store"
    assert "cluster: indexed-job" in r.stdout


def test_pytorchjob_and_slurm_variables_become_launcher_options():
    pet = detect_cluster({"PET_NNODES": "2:4", "PET_RDZV_ENDPOINT": "job-worker-0:23456",
                          "PET_NPROC_PER_NODE": "8", "PET_MAX_RESTARTS": "5"})
    assert (pet.source, pet.nnodes, pet.rdzv_endpoint, pet.nproc_per_node, pet.max_restarts) == \
        ("pytorchjob", "2:4", "job-worker-0:23456", "8", 5)
    slurm = detect_cluster({"SLURM_JOB_ID": "77", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "3",
                            "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_GPUS_ON_NODE": "4"})
    assert (slurm.source, slurm.nnodes, slurm.node_rank, slurm.rdzv_endpoint, slurm.nproc_per_node) == \
        ("slurm", "3", 1, "gpu07:29400", "4")
    assert first_host("a1,b[2-3]") == "a1" and first_host("n[010,012-014]") == "n010"
    assert detect_cluster({"HOME": "/root"}).source == "local"


def test_accelerate_backend_uses_the_same_rendezvous_and_refuses_a_node_range(digits_dir):
    r = launch_cli("--config", RECIPE, "--dry-run", "--backend", "accelerate", "--nnodes", "2",
                   "--node-rank", "1", "--rdzv-endpoint", "10.0.0.5:29400", f"data.train={digits_dir}")
    assert r.returncode == 0, r.stderr
    line = command_line(r.stdout)
    for part in ("accelerate launch", "--num_machines 2", "--machine_rank 1", "--main_process_ip 10.0.0.5",
                 "--rdzv_backend c10d", "--max_restarts 3"):
        assert part in line
    r = launch_cli("--config", RECIPE, "--dry-run", "--backend", "accelerate", "--nnodes", "1:2",
                   "--rdzv-endpoint", "10.0.0.5", f"data.train={digits_dir}")
    assert r.returncode == 2 and "--backend torchrun" in r.stderr


# -- real jobs ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_launch_trains_with_world_size_2_on_cpu(digits_dir, tmp_path):
    run = tmp_path / "r"
    r = run_cli("launch", "--config", RECIPE, "--nproc-per-node", "2", "train.max_steps=10", f"run.dir={run}",
                f"data.train={digits_dir}", *TINY, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "world size 2 on cpu" in r.stderr
    path, state = newest_checkpoint(str(run))
    assert state["step"] == 10 and state["world_size"] == 2


def start_node(rank: int, port: int, run: str, data: str, *overrides: str) -> subprocess.Popen:
    """One "node": `ganforge launch` with one process, meeting the other node at 127.0.0.1:port."""
    cmd = [os.path.join(BIN, "ganforge"), "launch", "--config", RECIPE, "--nnodes", "2", "--node-rank", str(rank),
           "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--max-restarts", "2",
           f"run.dir={run}", f"data.train={data}", *TINY, *overrides]
    log = open(os.path.join(os.path.dirname(run), f"node{rank}-{time.monotonic_ns()}.log"), "w")
    # Both "nodes" share this machine's cores: one thread each.
    env = {**CLEAN, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)


def finish(node: subprocess.Popen, timeout: float) -> int:
    """Wait for a node; kill its whole tree if it overruns so the test fails instead of hanging."""
    try:
        return node.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_node(node)
        raise


def kill_node(node: subprocess.Popen) -> None:
    """What losing a machine does: the agent and its workers die at once, without a word."""
    procs = [node.pid, *(c.pid for c in psutil.Process(node.pid).children(recursive=True))]
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.wait(timeout=30)


def node_logs(run, tail: int = 2500) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-tail:]}" for p in sorted(run.parent.glob("node*.log")))


@pytest.mark.slow
def test_two_agents_on_loopback_train_as_two_nodes(digits_dir, tmp_path):
    run, port = tmp_path / "run", free_port()
    nodes = [start_node(i, port, str(run), digits_dir, "train.max_steps=12") for i in (0, 1)]
    codes = [finish(n, 240) for n in nodes]
    assert codes == [0, 0], node_logs(run)
    path, state = newest_checkpoint(str(run))
    assert state["step"] == 12 and state["world_size"] == 2, node_logs(run)


@pytest.mark.slow
def test_losing_a_node_restarts_the_workers_and_resumes_from_the_last_checkpoint(digits_dir, tmp_path):
    run, port = tmp_path / "run", free_port()
    steps = ["train.max_steps=120", "checkpoint.every_steps=5", "log.every_steps=5"]
    host = start_node(0, port, str(run), digits_dir, *steps)
    lost = start_node(1, port, str(run), digits_dir, *steps)
    try:
        deadline = time.monotonic() + 180
        while not (os.path.isdir(run / "checkpoints") and any(
                (run / "checkpoints" / d / "COMMITTED").exists() for d in os.listdir(run / "checkpoints"))):
            assert time.monotonic() < deadline and host.poll() is None, "no checkpoint\n" + node_logs(run)
            time.sleep(0.2)
        kill_node(lost)
        assert host.poll() is None, "the job must still be running when node 1 is lost\n" + node_logs(run)
        # Node 0's agent notices (its worker's collective fails) and opens a new round. Only then
        # does the replacement arrive, as a new pod would: joining while node 0 still sees the
        # old round makes it restart twice in quick succession.
        while "failed (exitcode" not in node_logs(run):
            assert time.monotonic() < deadline and host.poll() is None, "node 0 did not notice\n" + node_logs(run)
            time.sleep(0.2)
        # The scheduler replaces the lost machine: the same command on a fresh node.
        replacement = start_node(1, port, str(run), digits_dir, *steps)
        codes = [finish(host, 240), finish(replacement, 60)]
    finally:
        for n in (host, lost):
            if n.poll() is None:
                kill_node(n)
    logs = node_logs(run)
    assert codes == [0, 0], logs
    resumed = re.findall(r"resuming from \S+ at step (\d+); world size 2", node_logs(run, tail=10**6))
    assert resumed and int(resumed[-1]) >= 5, logs
    path, state = newest_checkpoint(str(run))
    assert state["step"] == 120 and state["world_size"] == 2, logs


@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_and_exits_143(digits_dir, tmp_path):
    """What the kubelet does on preemption: SIGTERM to the container's launcher, and only to it."""
    run = tmp_path / "run"
    cmd = [os.path.join(BIN, "ganforge"), "launch", "--config", RECIPE, "--nproc-per-node", "2",
           "train.max_steps=100000", "checkpoint.every_steps=1000", f"run.dir={run}", f"data.train={digits_dir}",
           *TINY]
    log = open(tmp_path / "launch.log", "w")
    node = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**CLEAN, "OMP_NUM_THREADS": "1"},
                            cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while not re.search(r"ganforge: step \d+/", (tmp_path / "launch.log").read_text(), re.MULTILINE):
            assert time.monotonic() < deadline and node.poll() is None, (tmp_path / "launch.log").read_text()
            time.sleep(0.2)
        assert not (run / "checkpoints").exists() or not os.listdir(run / "checkpoints")
        node.send_signal(signal.SIGTERM)
        code = finish(node, 120)
    finally:
        if node.poll() is None:
            kill_node(node)
    out = (tmp_path / "launch.log").read_text()
    assert code == 143, out[-3000:]
    path, state = newest_checkpoint(str(run))
    assert 0 < state["step"] < 1000, "the stop must have written its own checkpoint"
