"""Streaming loader: reads this rank's planned samples from tar shards by byte offset.

Each DataLoader worker builds whole batches (round-robin over the rank's batches), so the
rank sees its plan in order for any number of workers; the stream position is one integer.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import mmap
import os
import signal
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.cache import ShardCache, ShardFeed
from data_pipeline.errors import DataError
from data_pipeline.index import (
    ShardIndex,
    ShardRecord,
    is_url,
    load_index,
    parse_label,
    read_location,
)
from data_pipeline.planner import (
    epoch_order,
    rank_positions,
    rank_slots,
    samples_at,
    worker_batches,
)
from data_pipeline.remote import FetchStats, RemoteClient, is_remote

log = logging.getLogger(__name__)

FETCH_FIELDS = tuple(f.name for f in dataclasses.fields(FetchStats))


@dataclass
class StreamSpec:
    """Everything that fixes what a rank reads: change none of it and the stream is identical."""

    seed: int
    rank: int = 0
    world_size: int = 1
    batch_size: int = 64  # per rank
    pad: bool = True
    drop_last: bool = True
    flip: bool = False
    block_shards: int = 0
    on_error: str = "raise"  # or "skip"
    groups: int = 1  # > 1: the epoch order is that many node streams (planner.epoch_order)
    ranks_per_node: int = 0  # ranks n*ranks_per_node ... share node n (0: unknown)
    cache_dir: str = ""  # node-local cache of remote shards ("" : read them into memory)
    cache_limit: int = 0  # bytes of unused shards the cache keeps (0: no limit)
    prefetch_shards: int = 2  # shards downloaded ahead of the reader
    # (sample, rng) -> sample, run in the loader workers after the flip; rng is drawn from (seed, epoch,
    # sample index) alone, so what it makes does not depend on the world size, the workers or a resume
    transform: Callable[[dict[str, torch.Tensor], np.random.Generator], dict[str, torch.Tensor]] | None = None


class ShardReader:
    """Random access to sample members: local shards memory-mapped, remote ones fetched whole and kept.

    `local` maps a shard number to a file holding it (the node cache's copy of a remote
    shard); without it, http(s) and s3 shards are downloaded into memory by `client`.
    """

    def __init__(self, index: ShardIndex, max_open: int = 64, client: RemoteClient | None = None,
                 local: Callable[[int], str] | None = None):
        self.index = index
        self.max_open = max_open
        self.client = client or RemoteClient()
        self.local = local
        self._number = {shard.name: i for i, shard in enumerate(index.shards)}
        self._open: OrderedDict[str, Any] = OrderedDict()

    def _buffer(self, shard: ShardRecord) -> Any:
        path = self.index.shard_path(shard)
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        if is_remote(path) and self.local is not None:
            buf = _map(self.local(self._number[shard.name]), shard)
        elif is_remote(path):
            data = io.BytesIO()
            self.client.download(path, data, shard.bytes, what=shard.name)
            buf = data.getvalue()
        elif is_url(path):
            try:
                buf: Any = read_location(path)
            except DataError as e:
                raise DataError(f"{shard.name}: {e}") from None
        else:
            buf = _map(path, shard)
        self._open[path] = buf
        if len(self._open) > self.max_open:
            old = self._open.popitem(last=False)[1]
            if isinstance(old, mmap.mmap):
                old.close()
        return buf

    def drop(self, shard: ShardRecord) -> None:
        """Forget `shard` (its mapping or bytes); a later read opens it again."""
        buf = self._open.pop(self.index.shard_path(shard), None)
        if isinstance(buf, mmap.mmap):
            buf.close()

    def read(self, sample: int) -> tuple[ShardRecord, str, dict[str, bytes]]:
        shard, rec = self.index.locate(sample)
        buf = self._buffer(shard)
        members = {}
        for ext, (offset, size, crc) in rec.members.items():
            payload = buf[offset:offset + size]
            if len(payload) != size:
                raise DataError(f"{shard.name}: key {rec.key}: member .{ext} truncated "
                                f"(read {len(payload)} of {size} bytes)")
            if zlib.crc32(payload) != crc:
                raise DataError(f"{shard.name}: key {rec.key}: member .{ext} is corrupt (crc32 mismatch)")
            members[ext] = payload
        return shard, rec.key, members

    def decode(self, sample: int) -> dict[str, torch.Tensor]:
        """Read and decode one sample; any problem is a DataError naming its shard and key."""
        shard, key, members = self.read(sample)
        try:
            return decode_sample(self.index.kind, self.index.meta, members)
        except DataError as e:
            raise DataError(f"{shard.name}: key {key}: {e}") from None
        except Exception as e:  # noqa: BLE001 - a decoder raises many kinds
            raise DataError(f"{shard.name}: key {key}: cannot decode ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        for buf in self._open.values():
            if isinstance(buf, mmap.mmap):
                buf.close()
        self._open.clear()


def _map(path: str, shard: ShardRecord) -> Any:
    """The file at `path` memory-mapped: pages are read on demand, with no syscall per member."""
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else b""
    except OSError as e:
        raise DataError(f"{shard.name}: cannot open shard ({e.strerror})") from None


warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


def _decode_image(payload: bytes, channels: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    return decode_image(torch.frombuffer(bytearray(payload), dtype=torch.uint8), mode=mode)


@functools.lru_cache(maxsize=64)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    import ast

    d = ast.literal_eval(header.decode("latin1"))
    return np.dtype(d["descr"]), tuple(d["shape"]), bool(d["fortran_order"])


def decode_npy(payload: bytes) -> np.ndarray:
    """np.load for one small .npy payload, parsing each distinct header once (np.load dominates otherwise)."""
    if payload[:6] != b"\x93NUMPY" or payload[6] != 1:
        return np.load(io.BytesIO(payload))
    start = 10 + int.from_bytes(payload[8:10], "little")
    dtype, shape, fortran = _npy_layout(payload[10:start])
    return np.frombuffer(payload, dtype=dtype, offset=start).reshape(shape, order="F" if fortran else "C")


def decode_sample(kind: str, meta: dict[str, Any], members: dict[str, bytes]) -> dict[str, torch.Tensor]:
    """Decode one sample's members into tensors (uint8 images, float32 points, int64 label).

    Whatever disagrees with the index metadata (image size or bit depth, label outside
    `label_names`) is a DataError naming the member, so a batch never mixes shapes or depths.
    """
    out: dict[str, torch.Tensor] = {}
    ext = meta.get("image_ext", "png")
    channels = int(meta.get("channels", 3))
    if kind == "image":
        out["image"] = _checked_image(members, ext, channels, meta.get("size"))
    elif kind == "paired":
        out["a"] = _checked_image(members, f"a.{ext}", channels, meta.get("size"))
        out["b"] = _checked_image(members, f"b.{ext}", channels, meta.get("size"))
    elif kind == "points":
        out["points"] = torch.from_numpy(decode_npy(members["npy"]).astype(np.float32))
        dims = meta.get("dims")
        if dims is not None and tuple(out["points"].shape) != (dims,):
            raise DataError(f"member .npy has shape {tuple(out['points'].shape)}, the index says ({dims},)")
    else:
        raise DataError(f"unknown dataset kind {kind!r}")
    if "cls" in members:
        out["label"] = torch.tensor(parse_label(members["cls"], meta.get("label_names")), dtype=torch.int64)
    return out


def _checked_image(members: dict[str, bytes], member: str, channels: int, size: int | None) -> torch.Tensor:
    image = _decode_image(members[member], channels)
    if image.dtype != torch.uint8:
        raise DataError(f"member .{member} is a {image.element_size() * 8}-bit image, the index says 8-bit "
                        "(write the shards again with `ganforge data make-shards`)")
    if size is not None and tuple(image.shape[1:]) != (size, size):
        raise DataError(f"member .{member} is {image.shape[2]}x{image.shape[1]} (WxH), the index says {size}x{size}")
    if image.shape[0] != channels:
        raise DataError(f"member .{member} has {image.shape[0]} channels, the index says {channels}")
    return image


def decode_samples(index: ShardIndex, samples) -> list[dict[str, torch.Tensor]]:
    """The given sample numbers of `index`, read (CRC-checked) and decoded, in that order."""
    reader = ShardReader(index)
    try:
        return [reader.decode(int(i)) for i in samples]
    finally:
        reader.close()


def check_shards_present(index: ShardIndex) -> None:
    """Fail fast, naming the shard, when a local shard is missing or its size disagrees with the index."""
    for shard in index.shards:
        path = index.shard_path(shard)
        if is_url(path):
            continue
        if not os.path.exists(path):
            raise DataError(f"{shard.name}: missing shard file {path}")
        size = os.path.getsize(path)
        if size != shard.bytes:
            raise DataError(f"{shard.name}: size {size} bytes does not match the index ({shard.bytes})")


class ShardStream(IterableDataset):
    """Yields this rank's batches for one epoch, from a start position; see the module docstring."""

    def __init__(self, index: ShardIndex | str, spec: StreamSpec):
        super().__init__()
        self.index = load_index(index) if isinstance(index, str) else index
        check_shards_present(self.index)
        if spec.on_error not in ("raise", "skip"):
            raise DataError(f"data.on_error must be 'raise' or 'skip', got {spec.on_error!r}")
        self.spec = spec
        if self.index.kind in ("image", "paired"):
            import torchvision.io  # noqa: F401 - once here, not in every forked loader worker
        self.remote = is_remote(self.index.root)
        if self.remote and spec.cache_dir:
            ShardCache(spec.cache_dir, spec.cache_limit, self.index, RemoteClient())  # a bad cache_dir fails here
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        """Next iteration reads epoch `epoch` from global position `start` (samples consumed)."""
        self.epoch, self.start = epoch, start

    def positions(self) -> np.ndarray:
        s = self.spec
        slots = rank_slots(s.world_size, s.groups, s.ranks_per_node, self.start)
        return rank_positions(self.index.num_samples, s.world_size, s.rank, self.start, s.pad, slots)

    def cache_bytes(self) -> int:
        """Bytes of shards in this node's cache now (0 without one)."""
        if not (self.remote and self.spec.cache_dir):
            return 0
        return ShardCache(self.spec.cache_dir, self.spec.cache_limit, self.index, RemoteClient()).size()

    def __iter__(self):
        s = self.spec
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        sizes = [sh.num_samples for sh in self.index.shards]
        order = epoch_order(sizes, s.seed, self.epoch, s.block_shards, s.groups)
        total = len(order)
        flips = np.random.default_rng([s.seed, self.epoch, 1]).random(total) < 0.5 if s.flip else None
        positions = self.positions()
        samples = samples_at(order, positions, self.start)
        batches = worker_batches(len(positions), s.batch_size, workers, worker, s.drop_last)
        client = RemoteClient(FetchStats())
        feed, last_use = self._feed(client, [samples[r.start:r.stop] for r in batches])
        reader = ShardReader(self.index, client=client, local=feed.path if feed else None)
        warned: set[str] = set()
        read = 0
        try:
            for rows in batches:
                items, skipped, last_good = [], 0, None
                for sample in samples[rows.start:rows.stop]:
                    item = self._load(reader, int(sample), warned)
                    if feed is not None:
                        self._release(reader, feed, last_use, int(sample), read)
                    read += 1
                    if item is None:  # skipped bad sample: repeat a good one so ranks stay in step
                        skipped += 1
                        continue
                    if flips is not None and flips[sample]:
                        item = {k: v.flip(-1) if v.dim() == 3 else v for k, v in item.items()}
                    if s.transform is not None:
                        item = s.transform(item, np.random.default_rng([s.seed, self.epoch, int(sample), 2]))
                    items.append(item)
                    last_good = item
                if skipped:
                    if last_good is None:
                        raise DataError(f"every sample of a batch was bad (epoch {self.epoch}, rank {s.rank})")
                    items += [last_good] * skipped
                batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
                batch["position"] = torch.as_tensor(positions[rows.start:rows.stop])
                batch["skipped"] = torch.tensor(skipped)
                if self.remote:
                    taken = client.stats.take()
                    batch["fetch"] = torch.tensor([float(taken[f]) for f in FETCH_FIELDS], dtype=torch.float64)
                yield batch
        finally:
            reader.close()
            if feed is not None:
                feed.close()

    def _feed(self, client: RemoteClient, reads: list[np.ndarray]) -> tuple[ShardFeed | None, dict[int, int]]:
        """For remote shards with a node cache: the feed of this worker's shards and each one's last read."""
        s = self.spec
        if not (self.remote and s.cache_dir):
            return None, {}
        mine = np.concatenate(reads) if reads else np.zeros(0, dtype=np.int64)
        shard_ids = [self.index.shard_of(int(x)) for x in mine]
        last_use = {sid: t for t, sid in enumerate(shard_ids)}
        cache = ShardCache(s.cache_dir, s.cache_limit, self.index, client)
        return ShardFeed(cache, list(dict.fromkeys(shard_ids)), s.prefetch_shards), last_use

    def _release(self, reader: ShardReader, feed: ShardFeed, last_use: dict[int, int], sample: int, read: int) -> None:
        """After the last read of a shard by this worker, let the cache evict it."""
        sid = self.index.shard_of(sample)
        if last_use.get(sid) == read:
            reader.drop(self.index.shards[sid])
            feed.release(sid)

    def _load(self, reader: ShardReader, sample: int, warned: set[str]) -> dict[str, torch.Tensor] | None:
        try:
            return reader.decode(sample)
        except DataError as e:
            if self.spec.on_error == "raise":
                raise
            name = self.index.locate(sample)[0].name
            if name not in warned:
                warned.add(name)
                log.warning("skipping bad sample (%s); further ones in %s are counted silently", e, name)
            return None


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: a worker outlives SIGTERM/SIGINT sent to its process group; the main process decides.

    torchrun, Kubernetes and a terminal signal the whole group; a worker killed by it would fail
    the main process before it reaches the step boundary where it checkpoints. The stop signals
    are blocked across the fork (see StopSafeLoader), so none lands before this runs. SIGTERM
    from the main process itself (multiprocessing's terminate() of a worker that does not
    leave when asked) still ends the worker, as torch's own worker handler does.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also discards one that arrived while blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = os.getppid()

    def obey_the_main_process_only() -> None:
        while True:  # SIGTERM stays blocked in every thread: it arrives here, not as a handler
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=obey_the_main_process_only, daemon=True, name="ganforge-sigterm").start()


def _report_worker_failures_at_fetch() -> None:
    """Keep torch's SIGCHLD handler from raising a worker's death in the middle of a step.

    The handler raises wherever the main thread happens to be (between an optimiser's updates,
    inside a collective); without it the loader raises the same error at the next fetch, where
    the step has not started and no collective is pending.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    handler = signal.getsignal(signal.SIGCHLD)
    if not callable(handler) or getattr(handler, "ganforge_deferred", False):
        return

    def deferred(signum: int, frame: object) -> None:
        try:
            handler(signum, frame)
        except RuntimeError:
            pass  # the loader raises it at the next fetch

    deferred.ganforge_deferred = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGCHLD, deferred)


class StopSafeLoader(DataLoader):
    """A DataLoader whose workers ignore stop signals and whose worker failures surface at a fetch."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # forked workers inherit the mask
        try:
            it = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _report_worker_failures_at_fetch()
        return it


def make_loader(stream: ShardStream, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over whole batches; iterate it once per (epoch, start) set on `stream`."""
    return StopSafeLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                          prefetch_factor=4 if num_workers > 0 else None,
                          multiprocessing_context="fork" if num_workers > 0 else None,
                          worker_init_fn=ignore_stop_signals if num_workers > 0 else None)
