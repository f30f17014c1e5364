"""The data plan as pure functions: which sample each rank and worker reads, in which order.

The global order of an epoch is a permutation of all samples that depends only on
(seed, epoch). Rank r of W reads the global positions start + r, start + r + W, ...
so after every rank has read i samples, exactly the positions below start + i*W are
consumed. That one integer (samples consumed in the epoch) is the whole data position:
a stream can restart from it with any world size or number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def epoch_order(shard_sizes: Sequence[int], seed: int, epoch: int, block_shards: int = 0) -> np.ndarray:
    """Global sample numbers in the order epoch `epoch` consumes them.

    block_shards <= 0 shuffles all samples; otherwise shards are shuffled, grouped into
    blocks of `block_shards` consecutive shards, and samples are shuffled within each block
    (fewer shards open at once when streaming from remote storage).
    """
    total = int(sum(shard_sizes))
    rng = np.random.default_rng([int(seed), int(epoch)])
    if block_shards <= 0 or block_shards >= len(shard_sizes):
        return rng.permutation(total)
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]]).astype(np.int64)
    shard_perm = rng.permutation(len(shard_sizes))
    blocks = []
    for b in range(0, len(shard_perm), block_shards):
        ids = np.concatenate([np.arange(starts[s], starts[s] + shard_sizes[s]) for s in shard_perm[b:b + block_shards]])
        blocks.append(rng.permutation(ids))
    return np.concatenate(blocks)


def rank_positions(total: int, world_size: int, rank: int, start: int = 0, pad: bool = True) -> np.ndarray:
    """Global positions rank `rank` reads from position `start` to the end of the epoch.

    Every rank gets the same count: the remainder is padded (positions >= total, at most
    world_size - 1 of them; see `samples_at`) or, with pad=False, dropped.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    remaining = max(0, total - start)
    per_rank = -(-remaining // world_size) if pad else remaining // world_size
    return start + rank + world_size * np.arange(per_rank, dtype=np.int64)


def samples_at(order: np.ndarray, positions: np.ndarray, start: int = 0) -> np.ndarray:
    """Sample numbers at global `positions` of an epoch read from `start`.

    A padding position total + j repeats the j-th sample of the part read from `start`, so a
    plan from any start holds exactly the keys of the positions >= start, plus repeats of them.
    """
    total = len(order)
    positions = np.asarray(positions, dtype=np.int64)
    remaining = max(1, total - start)
    wrapped = np.where(positions < total, positions, start + (positions - total) % remaining)
    return order[wrapped]


def worker_batches(count: int, batch_size: int, num_workers: int, worker: int, drop_last: bool) -> list[range]:
    """Index ranges (into a rank's list) of the batches worker `worker` of `num_workers` builds.

    Batches are dealt round-robin, which is the order a DataLoader collects them in, so the
    rank sees its list in order whatever the number of workers.
    """
    n_batches = count // batch_size if drop_last else -(-count // batch_size)
    return [range(b * batch_size, min(count, (b + 1) * batch_size))
            for b in range(worker, n_batches, max(1, num_workers))]


@dataclass(frozen=True)
class PlanEntry:
    rank: int
    index: int  # position in the rank's list
    global_pos: int  # position in the epoch's global order (>= num_samples: padding)
    sample: int  # global sample number in the index


def plan_rank(order: np.ndarray, world_size: int, rank: int, start: int = 0, pad: bool = True) -> list[PlanEntry]:
    """What one rank reads, in order, for an epoch whose global order is `order`."""
    positions = rank_positions(len(order), world_size, rank, start, pad)
    samples = samples_at(order, positions, start)
    return [PlanEntry(rank, i, int(g), int(k)) for i, (g, k) in enumerate(zip(positions, samples, strict=True))]


def plan_epoch(order: np.ndarray, world_size: int, start: int = 0, pad: bool = True) -> list[PlanEntry]:
    """Every rank's reads, in consumption order (global position, rank by rank within a step)."""
    entries = [e for r in range(world_size) for e in plan_rank(order, world_size, r, start, pad)]
    return sorted(entries, key=lambda e: (e.index, e.rank))
