"""The data plan as pure functions: which sample each rank and worker reads, in which order.

The global order of an epoch is a permutation of all samples that depends only on
(seed, epoch) and the plan settings (shuffle blocks, node groups). Rank r of W reads the
global positions start + s(r), start + s(r) + W, ... for a one-to-one slot s (the identity,
or the one that keeps each node on its own shards), so after every rank has read i samples,
exactly the positions below start + i*W are consumed. That one integer (samples consumed in the epoch) is the whole data position:
a stream can restart from it with any world size or number of workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def epoch_order(shard_sizes: Sequence[int], seed: int, epoch: int, block_shards: int = 0,
                groups: int = 1) -> np.ndarray:
    """Global sample numbers in the order epoch `epoch` consumes them.

    block_shards <= 0 shuffles all samples; otherwise shards are shuffled, grouped into
    blocks of `block_shards` consecutive shards, and samples are shuffled within each block
    (fewer shards open at once when streaming from remote storage).

    groups > 1 cuts the shuffled shards into `groups` streams of equal sample counts (a shard
    on a cut is shared by two streams) and interleaves them: position g belongs to stream
    g mod groups. `rank_slots` lets the ranks of one node read only their node's streams, so
    each node downloads mostly its own shards. The order does not depend on the world size.
    """
    total = int(sum(shard_sizes))
    rng = np.random.default_rng([int(seed), int(epoch)])
    if groups <= 1 and (block_shards <= 0 or block_shards >= len(shard_sizes)):
        return rng.permutation(total)
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]]).astype(np.int64)
    shard_perm = rng.permutation(len(shard_sizes))
    ordered = np.concatenate([np.arange(starts[s], starts[s] + shard_sizes[s]) for s in shard_perm])
    shard_ids = np.searchsorted(starts, ordered, side="right") - 1
    streams = [_shuffle_blocks(chunk, ids, block_shards, rng)
               for chunk, ids in zip(np.array_split(ordered, max(1, groups)),
                                     np.array_split(shard_ids, max(1, groups)), strict=True)]
    return _interleave(streams)


def _shuffle_blocks(samples: np.ndarray, shard_ids: np.ndarray, block_shards: int,
                    rng: np.random.Generator) -> np.ndarray:
    """`samples` (whole shards in a row) shuffled within blocks of `block_shards` shards; <= 0: all of them."""
    if block_shards <= 0:
        return rng.permutation(samples)
    cuts = np.flatnonzero(np.diff(shard_ids)) + 1
    pieces = np.split(samples, cuts)
    return np.concatenate([rng.permutation(np.concatenate(pieces[b:b + block_shards]))
                           for b in range(0, len(pieces), block_shards)])


def _interleave(streams: list[np.ndarray]) -> np.ndarray:
    """Round-robin over streams whose lengths differ by at most one, the longer ones first."""
    n, shortest = len(streams), min(len(s) for s in streams)
    out = np.empty(sum(len(s) for s in streams), dtype=np.int64)
    for g, stream in enumerate(streams):
        out[g:n * shortest:n] = stream[:shortest]
    out[n * shortest:] = [s[shortest] for s in streams if len(s) > shortest]
    return out


def streams_fit_nodes(world_size: int, groups: int, ranks_per_node: int) -> bool:
    """Whether each node of this layout can read only its own streams of a `groups`-stream order."""
    if groups <= 1 or ranks_per_node <= 0 or world_size % ranks_per_node:
        return False
    nodes = world_size // ranks_per_node
    return nodes > 1 and groups % nodes == 0 and world_size % groups == 0


def rank_slots(world_size: int, groups: int = 1, ranks_per_node: int = 0, start: int = 0) -> list[int]:
    """Which position of each step's window of `world_size` positions each rank reads.

    Any one-to-one choice keeps the data position one integer: after every rank has read i
    samples, exactly the positions below start + i*world_size are consumed. With an order of
    `groups` streams, the ranks of node n (ranks n*ranks_per_node ...) read the positions of
    the streams node n owns, when the layout allows it (nodes divide groups, groups divide the
    world size); otherwise rank r reads position r of the window.
    """
    slots = list(range(world_size))
    if not streams_fit_nodes(world_size, groups, ranks_per_node):
        return slots
    nodes = world_size // ranks_per_node
    owner = [((start + o) % groups) // (groups // nodes) for o in range(world_size)]
    by_node = [[o for o in range(world_size) if owner[o] == n] for n in range(nodes)]
    return [by_node[r // ranks_per_node][r % ranks_per_node] for r in range(world_size)]


def rank_positions(total: int, world_size: int, rank: int, start: int = 0, pad: bool = True,
                   slots: Sequence[int] | None = None) -> np.ndarray:
    """Global positions rank `rank` reads from position `start` to the end of the epoch.

    Every rank gets the same count: the remainder is padded (positions >= total, at most
    world_size - 1 of them; see `samples_at`) or, with pad=False, dropped. `slots` (see
    `rank_slots`) says which position of each window of `world_size` a rank reads.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    remaining = max(0, total - start)
    per_rank = -(-remaining // world_size) if pad else remaining // world_size
    slot = rank if slots is None else int(slots[rank])
    return start + slot + world_size * np.arange(per_rank, dtype=np.int64)


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


def plan_rank(order: np.ndarray, world_size: int, rank: int, start: int = 0, pad: bool = True,
              slots: Sequence[int] | None = None) -> list[PlanEntry]:
    """What one rank reads, in order, for an epoch whose global order is `order`."""
    positions = rank_positions(len(order), world_size, rank, start, pad, slots)
    samples = samples_at(order, positions, start)
    return [PlanEntry(rank, i, int(g), int(k)) for i, (g, k) in enumerate(zip(positions, samples, strict=True))]


def plan_epoch(order: np.ndarray, world_size: int, start: int = 0, pad: bool = True,
               slots: Sequence[int] | None = None) -> list[PlanEntry]:
    """Every rank's reads, in consumption order (global position, rank by rank within a step)."""
    entries = [e for r in range(world_size) for e in plan_rank(order, world_size, r, start, pad, slots)]
    return sorted(entries, key=lambda e: (e.index, e.rank))
