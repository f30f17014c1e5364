"""Remote shards: a real HTTP server on 127.0.0.1 (bench/shard_server.py, Python's http.server with
range requests), counting every request and byte on the server side; the node cache, retries,
verification, eviction and the node-partitioned plan."""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

from bench.shard_server import ShardServer, copy_dataset
from data_pipeline.cache import ShardCache
from data_pipeline.errors import DataError
from data_pipeline.index import load_index
from data_pipeline.loader import FETCH_FIELDS, ShardStream, StreamSpec, make_loader
from data_pipeline.planner import epoch_order, plan_epoch, rank_slots
from data_pipeline.remote import ATTEMPTS, RemoteClient


@pytest.fixture()
def served(digits_dir, tmp_path):
    """A private copy of the digits shards behind a local HTTP server."""
    server = ShardServer(copy_dataset(digits_dir, str(tmp_path / "served")))
    yield server
    server.close()


def dataset_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".tar"))


def read_epoch(url: str, workers: int = 2, **spec) -> tuple[list[int], dict[str, float]]:
    stream = ShardStream(url, StreamSpec(**{"seed": 0, "batch_size": 32, "drop_last": False, **spec}))
    batches = list(make_loader(stream, num_workers=workers))
    fetched = torch.stack([b["fetch"] for b in batches]).sum(0).tolist()
    return torch.cat([b["position"] for b in batches]).tolist(), dict(zip(FETCH_FIELDS, fetched, strict=True))


def test_two_workers_share_one_download_of_each_shard(served, tmp_path):
    positions, stats = read_epoch(served.url, cache_dir=str(tmp_path / "cache"))
    assert sorted(positions) == list(range(1797))
    tars = {n: c for n, c in served.requests.items() if n.endswith(".tar")}
    assert len(tars) == 8 and set(tars.values()) == {1}, f"a shard was requested more than once: {tars}"
    assert served.total_bytes() == dataset_bytes(served.root)
    assert stats["cache_misses"] == 8 and stats["cache_hits"] == 8  # the other worker finds each one cached
    assert stats["bytes_fetched"] == dataset_bytes(served.root)


def test_a_second_epoch_reads_from_the_cache_without_a_request(served, tmp_path):
    read_epoch(served.url, cache_dir=str(tmp_path / "cache"))
    before = served.total_requests()
    _, stats = read_epoch(served.url, cache_dir=str(tmp_path / "cache"))
    assert served.total_requests() == before
    assert stats["bytes_fetched"] == 0 and stats["cache_misses"] == 0


def test_server_faults_mid_epoch_are_retried_counted_and_resumed_by_range(served, tmp_path):
    served.fail("000003.tar", "503", "reset", "truncate", "500")
    positions, stats = read_epoch(served.url, workers=0, cache_dir=str(tmp_path / "cache"))
    assert sorted(positions) == list(range(1797))
    assert served.faults_served == Counter({"503": 1, "reset": 1, "truncate": 1, "500": 1})
    assert stats["retries"] == 4
    assert stats["bytes_fetched"] == dataset_bytes(served.root), "a truncated body resumes, not restarts"


def test_a_stalled_body_times_out_and_is_retried(served, tmp_path):
    served.stall_s = 2.0
    served.fail("000000.tar", "stall")
    index = load_index(served.url)
    client = RemoteClient(timeout_s=0.5, backoff_s=0.01)
    held = ShardCache(str(tmp_path / "cache"), 0, index, client).hold(index.shards[0])
    assert os.path.getsize(held.path) == index.shards[0].bytes
    assert client.stats.retries >= 1
    held.release()


def test_a_shard_that_keeps_failing_is_a_data_error_naming_shard_and_url_without_credentials(served, tmp_path):
    served.fail("000002.tar", *["503"] * ATTEMPTS)
    index = load_index(served.url.replace("http://", "http://reader:s3cret-pass@"))
    client = RemoteClient(backoff_s=0.01)
    with pytest.raises(DataError) as e:
        ShardCache(str(tmp_path / "cache"), 0, index, client).hold(index.shards[2])
    message = str(e.value)
    assert "000002.tar" in message and "127.0.0.1" in message and "HTTP 503" in message
    assert "s3cret-pass" not in message
    assert client.stats.retries == ATTEMPTS - 1 and served.requests["000002.tar"] == ATTEMPTS


def test_a_missing_shard_fails_at_once(served, tmp_path):
    os.unlink(os.path.join(served.root, "000005.tar"))
    index = load_index(served.url)
    with pytest.raises(DataError, match=r"000005\.tar: cannot fetch http://127\.0\.0\.1:\d+/000005\.tar \(HTTP 404\)"):
        ShardCache(str(tmp_path / "cache"), 0, index, RemoteClient()).hold(index.shards[5])
    assert served.requests["000005.tar"] == 1


def test_a_corrupt_download_is_fetched_once_more_then_named(served, tmp_path):
    path = os.path.join(served.root, "000004.tar")
    data = bytearray(open(path, "rb").read())
    data[1000] ^= 0xFF  # same size, different sha256
    open(path, "wb").write(bytes(data))
    index = load_index(served.url)
    cache = ShardCache(str(tmp_path / "cache"), 0, index, RemoteClient())
    with pytest.raises(DataError, match=r"000004\.tar: download from http://127\.0\.0\.1:\d+/000004\.tar does not match the index twice \(sha256"):
        cache.hold(index.shards[4])
    assert served.requests["000004.tar"] == 2
    assert not [n for n in os.listdir(cache.root) if n != ".locks"], "nothing unverified is left in the cache"


def test_eviction_keeps_the_limit_but_never_removes_a_held_shard(served, tmp_path):
    index = load_index(served.url)
    limit = 2 * index.shards[0].bytes
    cache = ShardCache(str(tmp_path / "cache"), limit, index, RemoteClient())
    kept = cache.hold(index.shards[0])  # a reader still needs it
    for s in (1, 2, 3, 4):
        cache.hold(index.shards[s]).release()
        assert cache.size() <= limit + index.shards[0].bytes
    assert os.path.exists(kept.path), "a held shard was evicted"
    assert not os.path.exists(os.path.join(cache.root, index.shards[1].name)), "the least recently used goes first"
    assert os.path.exists(os.path.join(cache.root, index.shards[4].name))
    kept.release()
    cache.hold(index.shards[1]).release()  # evicted earlier: downloaded again, and now shard 0 may go
    assert served.requests["000001.tar"] == 2
    assert cache.size() <= limit


def test_remote_batches_equal_local_batches(digits_dir, served, tmp_path):
    spec = {"seed": 3, "batch_size": 16, "drop_last": False, "block_shards": 2}
    local = list(make_loader(ShardStream(digits_dir, StreamSpec(**spec)), num_workers=2))
    remote = list(make_loader(ShardStream(served.url, StreamSpec(**spec, cache_dir=str(tmp_path / "c"))), num_workers=2))
    assert len(local) == len(remote)
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["position"], b["position"])


def test_an_unwritable_cache_dir_is_one_data_error(served, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="data.cache_dir .*file.*cannot create the cache"):
        ShardStream(served.url, StreamSpec(seed=0, cache_dir=str(blocker)))


# -- the node-partitioned plan (pure functions, no I/O) ------------------------------------

SHARDS = [200] * 9 + [37]


def shard_of(samples: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(SHARDS), samples, side="right")


@pytest.mark.parametrize("groups", [1, 2, 3, 4])
@pytest.mark.parametrize("block", [0, 1, 3])
def test_grouped_order_is_a_permutation_fixed_by_seed_and_epoch(groups, block):
    a = epoch_order(SHARDS, 5, 1, block, groups)
    assert sorted(a.tolist()) == list(range(sum(SHARDS)))
    assert np.array_equal(a, epoch_order(SHARDS, 5, 1, block, groups))
    assert not np.array_equal(a, epoch_order(SHARDS, 5, 2, block, groups))


@pytest.mark.parametrize("nodes,ranks", [(2, 2), (2, 3), (4, 1), (2, 1)])
def test_each_node_reads_its_own_shards(nodes, ranks):
    world = nodes * ranks
    order = epoch_order(SHARDS, 0, 0, block_shards=2, groups=nodes)
    entries = plan_epoch(order, world, slots=rank_slots(world, nodes, ranks))
    real = [e for e in entries if e.global_pos < len(order)]  # padding repeats the epoch's first samples
    per_node = [set(shard_of(np.array([e.sample for e in real if e.rank // ranks == n]))) for n in range(nodes)]
    shared = sum(len(a & b) for i, a in enumerate(per_node) for b in per_node[i + 1:])
    assert shared <= nodes - 1, "only a shard on a cut between two node streams is read by two nodes"
    assert sum(len(s) for s in per_node) <= len(SHARDS) + nodes - 1


def test_a_block_of_a_node_stream_spans_few_shards():
    order = epoch_order(SHARDS, 0, 0, block_shards=2, groups=2)
    per_node = [order[n::2] for n in range(2)]
    for stream in per_node:
        windows = [len(set(shard_of(stream[i:i + 64]))) for i in range(0, len(stream) - 64, 64)]
        assert max(windows) <= 4  # a batch of 64 from one node touches at most two blocks of 2 shards


@pytest.mark.parametrize("before,after", [((2, 2), (1, 2)), ((2, 2), (3, 1)), ((1, 3), (2, 2)), ((2, 2), (2, 2))])
@pytest.mark.parametrize("start", [0, 96, 1000, 1836])
def test_resume_with_another_layout_reads_every_remaining_sample_once(before, after, start):
    """The consumed positions are those below `start` whatever the layout, so any layout resumes exactly."""
    order = epoch_order(SHARDS, 2, 0, block_shards=1, groups=2)
    old_world, new_world = before[0] * before[1], after[0] * after[1]
    done = {e.sample for e in plan_epoch(order, old_world, slots=rank_slots(old_world, 2, before[1]))
            if e.global_pos < start}
    rest = plan_epoch(order, new_world, start=start, slots=rank_slots(new_world, 2, after[1], start))
    real = [e.sample for e in rest if e.global_pos < len(order)]
    assert len(real) == len(set(real)) == len(order) - start
    assert done | set(real) == set(range(len(order)))
    assert not done & set(real)


def test_the_data_cursor_reports_fetch_counters_and_prometheus_serves_them(served, tmp_path):
    import urllib.request

    from tests.conftest import free_port
    from trainer.data import DataCursor
    from trainer.distributed import DistEnv
    from trainer.families import load_config
    from trainer.telemetry.prometheus import PrometheusExporter

    cfg = load_config("configs/dcgan_digits.yaml", [f"data.train={served.url}", f"data.cache_dir={tmp_path / 'c'}",
                                                    "data.num_workers=2", "train.batch_size=32", f"run.dir={tmp_path / 'run'}"])
    cursor = DataCursor(cfg.data.train, cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    for _ in range(1797 // 32):
        cursor.next()
    metrics = cursor.fetch_metrics()
    assert metrics["data/bytes_fetched"] == served.total_bytes() == dataset_bytes(served.root)
    assert metrics["data/cache_misses"] == 8 and metrics["data/requests"] == 8
    assert metrics["data/cache_bytes"] == dataset_bytes(served.root)
    port = free_port()
    exporter = PrometheusExporter(port, rank=0, job="t", world_size=1)
    try:
        exporter.data_fetched(metrics)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        exporter.close()
    served_line = next(line for line in page.splitlines() if line.startswith("ganforge_data_fetched_bytes_total"))
    assert float(served_line.split()[-1]) == dataset_bytes(served.root)


@pytest.mark.parametrize("key", ["cache_limit", "prefetch_shards", "partition_nodes"])
def test_a_negative_data_setting_is_a_config_error_naming_the_key(key, tmp_path):
    from trainer.config import ConfigError
    from trainer.families import load_config

    with pytest.raises(ConfigError, match=rf"config error: data\.{key}: must be >= 0; got -1"):
        load_config("configs/dcgan_digits.yaml", [f"data.{key}=-1", f"run.dir={tmp_path}"])


def test_data_plan_prints_the_node_stream_plan_the_loader_reads(digits_dir):
    import json

    from tests.conftest import run_cli

    r = run_cli("data", "plan", digits_dir, "--world-size", "4", "--seed", "2", "--shuffle-block-shards", "2",
                "--partition-nodes", "2", "--ranks-per-node", "2", "--start", "64")
    assert r.returncode == 0, r.stderr
    printed = [json.loads(line) for line in r.stdout.splitlines()]
    stream = ShardStream(digits_dir, StreamSpec(seed=2, rank=1, world_size=4, batch_size=16, drop_last=False,
                                                block_shards=2, groups=2, ranks_per_node=2))
    stream.set_position(0, 64)
    read = [int(g) for b in make_loader(stream) for g in b["position"]]
    assert read == [p["global"] for p in printed if p["rank"] == 1]  # slot 2 of each window: node 0 reads stream 0
    order = epoch_order([s.num_samples for s in stream.index.shards], 2, 0, 2, 2)
    keys = stream.index.keys()
    assert all(keys[order[p["global"]]] == p["key"] for p in printed if p["global"] < len(order))


def test_a_cached_shard_cut_short_on_disk_is_downloaded_again(served, tmp_path):
    index = load_index(served.url)
    cache = ShardCache(str(tmp_path / "cache"), 0, index, RemoteClient())
    held = cache.hold(index.shards[6])
    held.release()
    os.truncate(held.path, 1000)
    again = cache.hold(index.shards[6])
    assert os.path.getsize(again.path) == index.shards[6].bytes
    assert served.requests["000006.tar"] == 2
    again.release()


def test_settings_that_multiply_downloads_are_named_in_one_warning_line_each(served, tmp_path, monkeypatch, caplog):
    from trainer.data import DataCursor
    from trainer.distributed import DistEnv
    from trainer.families import load_config

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    cfg = load_config("configs/dcgan_digits.yaml", [f"data.train={served.url}", "data.partition_nodes=2",
                                                    "train.batch_size=30", f"run.dir={tmp_path / 'run'}"])
    caplog.set_level("WARNING", logger="trainer")
    DataCursor(cfg.data.train, cfg, DistEnv(0, 3, 0, torch.device("cpu")))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("without data.cache_dir" in line for line in lines)
    assert any("data.partition_nodes=2 does not fit 3 nodes of 1 ranks" in line for line in lines)
    cfg.data.cache_dir, cfg.data.partition_nodes = str(tmp_path / "c"), 3
    caplog.clear()
    DataCursor(cfg.data.train, cfg, DistEnv(0, 3, 0, torch.device("cpu")))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_remote_epoch_resumed_on_another_layout_reads_every_remaining_sample_once(served, tmp_path):
    """2 nodes x 2 ranks read 12 steps of 4 x 16 samples; then 1 node x 3 ranks reads the rest of the epoch."""
    def ranks(world: int, per_node: int, start: int, steps: int | None) -> list[int]:
        out = []
        for rank in range(world):
            spec = StreamSpec(seed=4, rank=rank, world_size=world, batch_size=16, block_shards=2, groups=2,
                              ranks_per_node=per_node, cache_dir=str(tmp_path / f"node{rank // per_node}"))
            stream = ShardStream(served.url, spec)
            stream.set_position(0, start)
            batches = list(make_loader(stream))
            out += [int(p) for b in batches[:steps] for p in b["position"]]
        return out

    total, start = 1797, 12 * 4 * 16
    before = ranks(4, 2, 0, 12)
    after = ranks(3, 3, start, None)
    assert sorted(before) == list(range(start))
    assert sorted(p for p in after if p < total) == list(range(start, total - (total - start) % (3 * 16)))
    assert not set(before) & set(after)
