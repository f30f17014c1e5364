"""Losing node 0, the host of the job's c10d store: the other node exits with the retryable
store-lost code (not 1), and both nodes started again resume from the newest checkpoint."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time

import pytest

from launcher.launch import EXIT_STORE_LOST
from tests.conftest import BIN, REPO, free_port
from tests.test_launch import (
    CLEAN,
    RECIPE,
    TINY,
    finish,
    kill_node,
    newest_checkpoint,
    node_logs,
    start_node,
)

STEPS = ["train.max_steps=60", "checkpoint.every_steps=5", "log.every_steps=5"]


def wait_for_checkpoint(run, nodes, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.isdir(run / "checkpoints") and any(
            (run / "checkpoints" / d / "COMMITTED").exists() for d in os.listdir(run / "checkpoints"))):
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), "no checkpoint\n" + node_logs(run)
        time.sleep(0.2)


def lose_the_store_host_then_restart(run, start) -> None:
    """Two nodes (`start(rank, port)` starts one); once a checkpoint exists, node 0's machine is lost:
    the other node must exit EXIT_STORE_LOST. Then both are started again (the scheduler's new pods,
    a new node 0 hosting a new store) and must resume from the newest checkpoint and finish."""
    port = free_port()
    host, other = start(0, port), start(1, port)
    try:
        wait_for_checkpoint(run, [host, other])
        kill_node(host)  # the machine hosting the store is gone, agent and workers at once
        code = finish(other, 240)
    finally:
        for n in (host, other):
            if n.poll() is None:
                kill_node(n)
    assert code == EXIT_STORE_LOST, node_logs(run)
    _, before = newest_checkpoint(str(run))

    port = free_port()
    nodes = [start(i, port) for i in (0, 1)]
    codes = [finish(n, 240) for n in nodes]
    logs = node_logs(run, tail=10**6)
    assert codes == [0, 0], node_logs(run)
    resumed = re.findall(r"resuming from \S+ at step (\d+); world size 2", logs)
    assert resumed and int(resumed[-1]) >= before["step"] >= 5, node_logs(run)
    _, state = newest_checkpoint(str(run))
    assert state["step"] == 60 and state["world_size"] == 2, node_logs(run)


@pytest.mark.slow
def test_store_host_loss_makes_the_other_node_exit_retryable_and_a_restart_resumes(digits_dir, tmp_path):
    run = tmp_path / "run"
    lose_the_store_host_then_restart(run, lambda rank, port: start_node(rank, port, str(run), digits_dir, *STEPS))


@contextlib.contextmanager
def two_namespaces():
    """Two network namespaces joined by a veth pair, 10.231.0.1 and 10.231.0.2 (as docs/launch.md's
    recipe); removed afterwards. Yields their names."""
    tag = f"{os.getpid() % 100000}"
    names, links = [f"gfs{tag}a", f"gfs{tag}b"], [f"gv{tag}a", f"gv{tag}b"]
    steps = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
             ["ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1]]]
    for i in (0, 1):
        steps += [["ip", "link", "set", links[i], "netns", names[i]],
                  ["ip", "-n", names[i], "addr", "add", f"10.231.0.{i + 1}/24", "dev", links[i]],
                  ["ip", "-n", names[i], "link", "set", links[i], "up"],
                  ["ip", "-n", names[i], "link", "set", "lo", "up"]]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True)
        yield names, links
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def start_node_in(namespace: str, link: str, rank: int, port: int, run, data: str) -> subprocess.Popen:
    """One node: `ganforge launch` inside a network namespace, meeting the other at 10.231.0.1:port."""
    cmd = ["ip", "netns", "exec", namespace, "env", f"GLOO_SOCKET_IFNAME={link}", "OMP_NUM_THREADS=1",
           os.path.join(BIN, "ganforge"), "launch", "--config", RECIPE, "--nnodes", "2", "--node-rank", str(rank),
           "--nproc-per-node", "1", "--rdzv-endpoint", f"10.231.0.1:{port}", "--local-addr", f"10.231.0.{rank + 1}",
           "--max-restarts", "2",
           f"run.dir={run}", f"data.train={data}", *TINY, *STEPS]
    log = open(run.parent / f"node{rank}-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=CLEAN, cwd=REPO)


@pytest.mark.slow
def test_store_host_loss_in_two_network_namespaces(digits_dir, tmp_path):
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("network namespaces need root, and CI runs every test")
        pytest.skip("network namespaces need root")
    run = tmp_path / "run"
    with two_namespaces() as (names, links):
        lose_the_store_host_then_restart(
            run, lambda rank, port: start_node_in(names[rank], links[rank], rank, port, run, digits_dir))


def test_store_lost_is_told_from_other_agent_failures(tmp_path):
    import json

    from launcher.launch import _store_lost

    path = tmp_path / "error.json"
    for message, lost in [("RendezvousConnectionError: The connection to the C10d store has failed.", True),
                          ("DistNetworkError: failed to recv, got 0 bytes", True),
                          ("ChildFailedError: trainer/main.py FAILED", False), ("ValueError: bad", False)]:
        path.write_text(json.dumps({"message": {"message": message, "extraInfo": {}}}))
        assert _store_lost(str(path)) is lost, message
    assert _store_lost(str(tmp_path / "absent.json")) is False
