"""The data plan: every sample exactly once per epoch, for any world size, workers and resume point."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from data_pipeline.planner import epoch_order, plan_epoch, plan_rank, rank_positions, worker_batches
from tests.conftest import run_cli

SHARDS = [37, 50, 13, 50, 1]  # uneven on purpose: 151 samples
TOTAL = sum(SHARDS)


@pytest.mark.parametrize("block", [0, 1, 2])
def test_order_is_a_permutation_fixed_by_seed_and_epoch(block):
    a = epoch_order(SHARDS, seed=3, epoch=1, block_shards=block)
    assert sorted(a.tolist()) == list(range(TOTAL))
    assert np.array_equal(a, epoch_order(SHARDS, seed=3, epoch=1, block_shards=block))
    assert not np.array_equal(a, epoch_order(SHARDS, seed=3, epoch=2, block_shards=block))
    assert not np.array_equal(a, epoch_order(SHARDS, seed=4, epoch=1, block_shards=block))


def test_block_shuffle_keeps_each_block_of_shards_together():
    order = epoch_order(SHARDS, seed=0, epoch=0, block_shards=1)
    starts = np.cumsum([0] + SHARDS)
    shard_of = np.searchsorted(starts, order, side="right") - 1
    runs = [k for i, k in enumerate(shard_of) if i == 0 or k != shard_of[i - 1]]
    assert sorted(runs) == list(range(len(SHARDS)))  # each shard read in one contiguous run


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("pad", [True, False])
def test_every_sample_once_per_epoch_for_any_world_size(world, pad):
    order = epoch_order(SHARDS, seed=1, epoch=0)
    per_rank = [plan_rank(order, world, r, pad=pad) for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1, "ranks must read equal counts"
    counts = Counter(e.sample for p in per_rank for e in p)
    if pad:
        assert set(counts) == set(range(TOTAL))
        assert sum(counts.values()) - TOTAL == (-TOTAL) % world <= world - 1
    else:
        assert all(c == 1 for c in counts.values())
        assert TOTAL - len(counts) == TOTAL % world


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("workers", range(0, 5))
def test_workers_deal_batches_so_the_rank_reads_its_plan_in_order(world, workers):
    count, batch = len(rank_positions(TOTAL, world, 0)), 4
    for drop_last in (True, False):
        per_worker = [worker_batches(count, batch, workers, w, drop_last) for w in range(max(1, workers))]
        # A DataLoader takes one batch from each worker in turn.
        interleaved = [b for rnd in range(max(map(len, per_worker))) for w in per_worker if rnd < len(w) for b in [w[rnd]]]
        flat = [i for r in interleaved for i in r]
        expected = count - count % batch if drop_last else count
        assert flat == list(range(expected))


@pytest.mark.parametrize("old_world,new_world", [(2, 1), (1, 2), (3, 2), (2, 5), (8, 3)])
def test_resume_with_changed_world_size_reads_exactly_the_remainder(old_world, new_world):
    order = epoch_order(SHARDS, seed=7, epoch=3)
    for steps in range(0, TOTAL // (4 * old_world) + 1):
        start = steps * 4 * old_world  # samples consumed by `steps` global batches of 4 per rank
        before = {e.global_pos for e in plan_epoch(order, old_world) if e.global_pos < start}
        after = plan_epoch(order, new_world, start=start)
        real_after = [e.global_pos for e in after if e.global_pos < TOTAL]
        assert sorted(real_after) == list(range(start, TOTAL)), "remainder read exactly once"
        assert before.isdisjoint(real_after)
        assert len(after) - len(real_after) <= new_world - 1
        assert {e.sample for e in after} == {int(order[g]) for g in range(start, TOTAL)}


def test_consumption_order_is_global_position_order():
    order = epoch_order(SHARDS, seed=0, epoch=0)
    entries = plan_epoch(order, 3)
    assert [e.global_pos for e in entries] == sorted(e.global_pos for e in entries)
    assert all(e.sample == order[e.global_pos] for e in entries if e.global_pos < TOTAL)


def _plan(directory, *args):
    r = run_cli("data", "plan", directory, *args)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_plan_cli_lists_every_key_and_resumes_on_another_world_size(digits_dir):
    from data_pipeline import load_index

    keys = load_index(digits_dir).keys()
    three = _plan(digits_dir, "--world-size", "3", "--seed", "1", "--epoch", "0")
    assert {"rank", "index", "global", "key"} <= set(three[0])
    assert Counter(e["key"] for e in three).keys() == set(keys)
    assert len(three) - len(keys) <= 2
    n = 600
    two = _plan(digits_dir, "--world-size", "2", "--seed", "1", "--epoch", "0", "--start", str(n))
    rest3 = {e["key"] for e in three if e["global"] >= n}
    assert {e["key"] for e in two} == rest3  # padding repeats keys of the remainder only
    assert len(rest3) == len(keys) - n and len(two) - len(rest3) <= 1
