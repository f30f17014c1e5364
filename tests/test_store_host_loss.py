"""Losing node 0, the host of the job's c10d store: the other node exits with the retryable
store-lost code (not 1), and both nodes started again resume from the newest checkpoint."""

from __future__ import annotations

import os
import re
import time

import pytest

from launcher.launch import EXIT_STORE_LOST
from tests.conftest import free_port
from tests.test_launch import finish, kill_node, newest_checkpoint, node_logs, start_node

STEPS = ["train.max_steps=60", "checkpoint.every_steps=5", "log.every_steps=5"]


def wait_for_checkpoint(run, nodes, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not (os.path.isdir(run / "checkpoints") and any(
            (run / "checkpoints" / d / "COMMITTED").exists() for d in os.listdir(run / "checkpoints"))):
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), "no checkpoint\n" + node_logs(run)
        time.sleep(0.2)


@pytest.mark.slow
def test_store_host_loss_makes_the_other_node_exit_retryable_and_a_restart_resumes(digits_dir, tmp_path):
    run, port = tmp_path / "run", free_port()
    host = start_node(0, port, str(run), digits_dir, *STEPS)
    other = start_node(1, port, str(run), digits_dir, *STEPS)
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

    # The scheduler retries both pods (a new node 0 hosts a new store under the same run id).
    port = free_port()
    nodes = [start_node(i, port, str(run), digits_dir, *STEPS) for i in (0, 1)]
    codes = [finish(n, 240) for n in nodes]
    logs = node_logs(run, tail=10**6)
    assert codes == [0, 0], node_logs(run)
    resumed = re.findall(r"resuming from \S+ at step (\d+); world size 2", logs)
    assert resumed and int(resumed[-1]) >= before["step"] >= 5, node_logs(run)
    _, state = newest_checkpoint(str(run))
    assert state["step"] == 60 and state["world_size"] == 2, node_logs(run)


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
