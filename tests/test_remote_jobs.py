"""Remote shards in real multi-process jobs (torchrun, gloo on CPU) against a local HTTP server
that counts requests and bytes: two "nodes" with their own caches (and server faults mid-epoch), and a SIGKILLed training run
that resumes exactly."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

from bench.shard_server import ShardServer, copy_dataset
from data_pipeline.index import load_index
from data_pipeline.planner import epoch_order, plan_epoch, rank_slots
from tests.conftest import BIN, REPO, free_port
from tests.test_resume import losses, signal_tree, start_and_wait_for_step
from trainer.checkpoint import read_checkpoint

pytestmark = pytest.mark.slow

ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture()
def served(digits_dir, tmp_path):
    server = ShardServer(copy_dataset(digits_dir, str(tmp_path / "served")))
    yield server
    server.close()


def test_two_nodes_of_two_ranks_and_two_workers_read_every_sample_once_and_each_node_fetches_its_shards_once(
        served, tmp_path):
    port, out = free_port(), tmp_path / "out"
    out.mkdir()
    served.fail("000002.tar", "503", "reset")  # whichever node asks first gets both faults
    spec = ["batch_size=16", "block_shards=2", "groups=2", "prefetch_shards=2", "workers=2"]
    nodes = []
    for node in (0, 1):
        cmd = [os.path.join(BIN, "torchrun"), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "remote-test",
               "tests/remote_probe.py", served.url, str(tmp_path / f"cache{node}"), str(out), *spec]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO))
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(log[-3000:] for log in logs)
    ranks = [json.load(open(out / f"rank{r}.json")) for r in range(4)]

    index = load_index(served.root)
    total = index.num_samples
    real = [p for r in ranks for p in r["positions"] if p < total]
    assert sorted(real) == list(range(total)), "every sample of the epoch exactly once"

    # Each node downloads each shard its own ranks need, once: the server's count is exactly that.
    order = epoch_order([s.num_samples for s in index.shards], 0, 0, block_shards=2, groups=2)
    plan = plan_epoch(order, 4, slots=rank_slots(4, 2, 2))
    needs = [{index.shard_of(e.sample) for e in plan if e.rank // 2 == node} for node in (0, 1)]
    expected = {index.shards[s].name: sum(s in n for n in needs) for s in range(len(index.shards))}
    expected["000002.tar"] += 2  # the two failed attempts, retried
    assert {n: c for n, c in served.requests.items() if n.endswith(".tar")} == {n: c for n, c in expected.items() if c}
    assert sum(expected.values()) <= len(index.shards) + 1 + 3 + 2  # a shard on the cut, 3 padding samples, 2 faults
    for node in (0, 1):
        cached = [f for f in os.listdir(tmp_path / f"cache{node}" / index.fingerprint()) if not f.startswith(".")]
        assert len(cached) == len(needs[node])
    assert sum(r["bytes_fetched"] for r in ranks) == served.total_bytes()
    assert sum(r["retries"] for r in ranks) == 2 and served.faults_served == {"503": 1, "reset": 1}


RECIPE = "configs/dcgan_digits.yaml"
SMALL = ["model.g_width=16", "model.d_width=16", "model.z_dim=16", "train.batch_size=32",
         "log.mlflow_uri=none", "log.every_steps=1", "checkpoint.every_steps=5", "data.num_workers=2"]
EPOCH = 1797 // 32  # steps of one epoch at batch 32


def launch(url: str, run: str, cache: str) -> list[str]:
    return [os.path.join(BIN, "ganforge"), "launch", "--config", RECIPE, "--nproc-per-node", "2",
            f"data.train={url}", f"data.cache_dir={cache}", f"run.dir={run}", f"train.max_steps={EPOCH}", *SMALL]


def test_launch_trains_an_epoch_fetching_each_shard_once_and_a_sigkilled_run_resumes_exactly(served, tmp_path):
    reference = str(tmp_path / "reference")
    r = subprocess.run(launch(served.url, reference, str(tmp_path / "cache-ref")), capture_output=True, text=True,
                       timeout=400, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    tars = {n: c for n, c in served.requests.items() if n.endswith(".tar")}
    assert len(tars) == 8 and set(tars.values()) == {1}, f"each shard fetched once per epoch: {tars}"
    metrics = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    assert max(m["data/epoch"] for m in metrics) == 0 and metrics[-1]["step"] == EPOCH
    # the metrics log carries the job's remote reads: both ranks' (and their workers') sums
    assert metrics[-1]["data/bytes_fetched"] == served.total_bytes()
    assert metrics[-1]["data/cache_misses"] == 8 and metrics[-1]["data/cache_bytes"] > 0

    run = str(tmp_path / "run")
    cmd = launch(served.url, run, str(tmp_path / "cache"))
    proc = start_and_wait_for_step(cmd, 20)
    signal_tree(proc, signal.SIGKILL)
    proc.wait(30)
    killed_at = max(losses(run))
    assert 20 <= killed_at < EPOCH, "the job must be killed mid-epoch"
    time.sleep(0.5)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert 0 < int(re.search(r"resuming from \S+ at step (\d+)", r.stderr).group(1)) <= killed_at
    assert losses(run) == losses(reference), "losses differ after resume"
    final = f"step_{EPOCH:08d}"
    ref, got = (read_checkpoint(os.path.join(d, "checkpoints", final)) for d in (reference, run))
    for net in ("G", "D", "G_ema"):
        for k, v in ref[net].items():
            assert torch.equal(v, got[net][k]), f"{net}.{k} differs after resume"
