"""The trainer's view of the data: a cursor over epochs whose whole state is (epoch, consumed)."""

from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from data_pipeline import DataError
from data_pipeline.loader import FETCH_FIELDS, ShardStream, StreamSpec, make_loader
from data_pipeline.planner import streams_fit_nodes
from trainer.config import Config
from trainer.distributed import DistEnv

log = logging.getLogger(__name__)


class Waits(NamedTuple):
    """What a cursor's `next()` calls cost since the last `take_waits()`."""

    seconds: float  # time spent inside next(), fetching included
    images: int  # samples it delivered
    first_request: float | None  # perf_counter() when the first of those calls began (None: no call)


class DataCursor:
    """Endless stream of this rank's batches; `consumed` counts samples of the epoch across all ranks."""

    def __init__(self, location: str, cfg: Config, env: DistEnv, seed: int | None = None, transform=None):
        self.global_batch = cfg.train.batch_size
        spec = StreamSpec(
            seed=cfg.seed if seed is None else seed, rank=env.rank, world_size=env.world_size,
            batch_size=cfg.train.batch_size // env.world_size, pad=cfg.data.pad, drop_last=True,
            flip=cfg.data.flip, block_shards=cfg.data.shuffle_block_shards, on_error=cfg.data.on_error,
            groups=max(1, cfg.data.partition_nodes), ranks_per_node=local_world_size(),
            cache_dir=cfg.data.cache_dir, cache_limit=cfg.data.cache_limit, prefetch_shards=cfg.data.prefetch_shards,
            transform=transform)
        self.stream = ShardStream(location, spec)
        if self.stream.index.num_samples < self.global_batch:
            raise DataError(f"{location}: {self.stream.index.num_samples} samples, fewer than one "
                            f"global batch ({self.global_batch})")
        self.loader = make_loader(self.stream, cfg.data.num_workers, pin_memory=env.device.type == "cuda")
        if env.is_main:
            warn_about_remote_reads(self.stream, cfg, spec)
        self.device, self.world_size = env.device, env.world_size
        self.counting = cfg.data.on_error == "skip"  # nothing is ever skipped otherwise
        self.max_skip_fraction = cfg.data.max_skip_fraction
        self.epoch, self.consumed, self.skipped = 0, 0, 0  # skipped: bad samples of every rank, whole run
        self.fetched = dict.fromkeys(FETCH_FIELDS, 0.0)  # this rank's remote reads, all its workers, whole process
        self._it = None
        self._wait_s, self._images, self._first_request = 0.0, 0, None

    def take_waits(self) -> Waits:
        """The time spent in next() and the images delivered since the last call, and start counting anew."""
        waits = Waits(self._wait_s, self._images, self._first_request)
        self._wait_s, self._images, self._first_request = 0.0, 0, None
        return waits

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self.skipped = int(state.get("skipped", 0))
        self._it = None

    def next(self) -> dict[str, torch.Tensor]:
        """The next batch on the device (uint8 images as they were stored); its wait counts in take_waits()."""
        t0 = time.perf_counter()
        if self._first_request is None:
            self._first_request = t0
        batch = self._fetch()
        self._wait_s += time.perf_counter() - t0
        self._images += len(next(iter(batch.values())))
        return batch

    def _fetch(self) -> dict[str, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                self.stream.set_position(self.epoch, self.consumed)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.consumed, self._it = self.epoch + 1, 0, None
                continue
            except DataError as e:  # raised in a loader worker: torch wraps it in the worker's traceback
                raise DataError(worker_error_line(e)) from None
            self.consumed += self.global_batch
            self.count_skipped(batch.pop("skipped"))
            if "fetch" in batch:
                for name, value in zip(FETCH_FIELDS, batch.pop("fetch").tolist(), strict=True):
                    self.fetched[name] += value
            return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        raise DataError("the data stream yields no batch for a whole epoch")

    def fetch_metrics(self) -> dict[str, float]:
        """This rank's remote-read counters (`data/bytes_fetched`, `data/cache_hits`, ...) and the node cache's size."""
        if not self.stream.remote:
            return {}
        out = {f"data/{name}": value for name, value in self.fetched.items()}
        out["data/cache_bytes"] = float(self.stream.cache_bytes())
        return out

    def count_skipped(self, skipped: torch.Tensor) -> None:
        """Add the bad samples of this batch on every rank to the run's total; stop past the bound.

        Every rank fetches in step, so the one all-reduce here (only with data.on_error=skip)
        pairs up, and every rank sees the same total and stops at the same batch. The bound
        is on max(samples read, dataset size): a few bad samples early in the first epoch do
        not stop the run, more than the fraction of the dataset does.
        """
        if not self.counting:
            return
        if self.world_size > 1:
            skipped = skipped.to(self.device, torch.int64)
            dist.all_reduce(skipped)
        self.skipped += int(skipped)
        size = self.stream.index.num_samples
        read = self.epoch * size + self.consumed
        if self.skipped > self.max_skip_fraction * max(read, size):
            raise DataError(f"{self.skipped} bad samples skipped out of {read} read ({self.skipped / read:.2%}), "
                            f"more than data.max_skip_fraction={self.max_skip_fraction:g}; repair the shards (`ganforge data verify`) or raise the bound")


def warn_about_remote_reads(stream: ShardStream, cfg: Config, spec: StreamSpec) -> None:
    """One line each for settings that make remote data travel more than once per node and epoch."""
    if stream.remote and not cfg.data.cache_dir:
        log.warning("remote shards without data.cache_dir: every loader worker downloads each shard it reads, "
                    "into memory; set data.cache_dir to share one download per node")
    nodes = spec.world_size // spec.ranks_per_node if spec.ranks_per_node else 0
    if cfg.data.partition_nodes > 1 and nodes > 1 and not streams_fit_nodes(spec.world_size, spec.groups, spec.ranks_per_node):
        log.warning("data.partition_nodes=%d does not fit %d nodes of %d ranks (the node count must divide it, "
                    "and it the world size): every node reads from every node stream", cfg.data.partition_nodes,
                    nodes, spec.ranks_per_node)


def local_world_size() -> int:
    """Ranks on this node, as torchrun sets it (0: unknown)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "0"))


def worker_error_line(error: DataError) -> str:
    """The message of a DataError raised in a loader worker, without the traceback torch wraps it in."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split("DataError: ", 1)[1] if "DataError: " in last else last


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> [-1, 1] in the default dtype (float64 in an fp64 run), on the images' device."""
    return images.to(torch.get_default_dtype()).div_(127.5).sub_(1.0)
