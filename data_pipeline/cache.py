"""Node-local shard cache for remote (http(s)://, s3://) shards: downloaded once per node, verified, then read like local ones.

Layout: `<cache_dir>/<dataset fingerprint>/<shard name>`. A download goes to a hidden file
beside its shard and is renamed in only once its size and sha256 match the index, so a shard
file that exists is complete. An exclusive lock per shard (`.locks/<name>`) makes the ranks
and loader workers of one node share one download. A reader holds a shared lock on the shard
file while it needs it; eviction (least recently used first, once the cache holds more than
its limit) removes only shards that nobody holds, so the cache can stay above its limit while
every shard in it is in use.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from data_pipeline.errors import DataError
from data_pipeline.index import ShardIndex, ShardRecord
from data_pipeline.redact import redact_url
from data_pipeline.remote import FetchStats, RemoteClient

LOCKS = ".locks"
PART = ".part"


class HeldShard:
    """A cached shard file that eviction leaves alone until `release`."""

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the shared lock
            self._fd = -1


class ShardCache:
    """The shards of one dataset on this node's disk, at most `limit` bytes of unused ones (0: no limit)."""

    def __init__(self, directory: str, limit: int, index: ShardIndex, client: RemoteClient):
        self.index, self.limit, self.client = index, limit, client
        self.root = os.path.join(directory, index.fingerprint())
        try:
            os.makedirs(os.path.join(self.root, LOCKS), exist_ok=True)
        except OSError as e:
            raise DataError(f"data.cache_dir {directory}: cannot create the cache ({e.strerror})") from None

    @property
    def stats(self) -> FetchStats:
        return self.client.stats

    def hold(self, shard: ShardRecord) -> HeldShard:
        """`shard` on local disk, downloaded first if no process of this node has done it."""
        path = os.path.join(self.root, shard.name)
        held = _open_held(path, shard.bytes)
        if held is None:
            with _locked(os.path.join(self.root, LOCKS, shard.name)):
                held = _open_held(path, shard.bytes)  # another process may have finished it meanwhile
                if held is None:
                    self._download(shard, path)
                    self.stats.add(cache_misses=1)
                    held = _open_held(path, shard.bytes)
                else:
                    self.stats.add(cache_hits=1)
            self.evict()
        else:
            self.stats.add(cache_hits=1)
        if held is None:
            raise DataError(f"{shard.name}: removed from the cache {self.root} while being opened")
        os.utime(path)  # recency for eviction
        return held

    def _download(self, shard: ShardRecord, path: str) -> None:
        """Fetch, verify and rename into place; one more fetch after a mismatch, then a DataError."""
        url = self.index.shard_path(shard)
        for stale in os.listdir(self.root):  # left by a process killed mid-download (we hold the lock)
            if stale.startswith(f".{shard.name}.") and stale.endswith(PART):
                os.unlink(os.path.join(self.root, stale))
        tmp = os.path.join(self.root, f".{shard.name}.{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}{PART}")
        problem = ""
        for _ in range(2):
            try:
                with open(tmp, "w+b") as f:
                    self.client.download(url, f, shard.bytes, what=shard.name)
                    problem = _mismatch(f, shard)
                if not problem:
                    os.replace(tmp, path)
                    return
            except OSError as e:
                raise DataError(f"{shard.name}: cannot write to the cache {self.root} ({e.strerror})") from None
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        raise DataError(f"{shard.name}: download from {redact_url(url)} does not match the index twice ({problem})")

    def evict(self) -> None:
        """Remove least recently used shards that nobody holds until the cache fits its limit."""
        if self.limit <= 0:
            return
        with _locked(os.path.join(self.root, LOCKS, ".evict"), wait=False) as mine:
            if not mine:
                return  # another process of this node is evicting
            entries = []
            for name in os.listdir(self.root):
                if not name.startswith("."):
                    st = os.stat(os.path.join(self.root, name))
                    entries.append((st.st_mtime, name, st.st_size))
            total = sum(e[2] for e in entries)
            for _, name, size in sorted(entries):
                if total <= self.limit:
                    break
                if _remove_unheld(os.path.join(self.root, name), os.path.join(self.root, LOCKS, name)):
                    total -= size

    def size(self) -> int:
        """Bytes of complete shards in the cache now."""
        return sum(e.stat().st_size for e in os.scandir(self.root) if e.is_file() and not e.name.startswith("."))


class ShardFeed:
    """The shards one reader needs, in order of first use: held `ahead` of it in background threads."""

    def __init__(self, cache: ShardCache, shards: Sequence[int], ahead: int):
        self.cache, self.shards, self.ahead = cache, list(shards), max(0, ahead)
        self._rank = {s: i for i, s in enumerate(self.shards)}
        self._pending: dict[int, Future[HeldShard]] = {}
        self._held: dict[int, HeldShard] = {}
        self._submitted = 0
        self._pool = ThreadPoolExecutor(max_workers=min(self.ahead, 4), thread_name_prefix="ganforge-prefetch") \
            if self.ahead else None

    def path(self, shard: int) -> str:
        """The local file of shard number `shard` (blocks until it is downloaded)."""
        if shard not in self._held:
            self._prefetch_through(self._rank.get(shard, -1) + self.ahead)
            future = self._pending.pop(shard, None)
            self._held[shard] = future.result() if future else self.cache.hold(self.cache.index.shards[shard])
        return self._held[shard].path

    def _prefetch_through(self, last: int) -> None:
        if self._pool is None:
            return
        while self._submitted <= min(last, len(self.shards) - 1):
            s = self.shards[self._submitted]
            self._submitted += 1
            if s not in self._held and s not in self._pending:
                self._pending[s] = self._pool.submit(self.cache.hold, self.cache.index.shards[s])

    def release(self, shard: int) -> None:
        """Shard number `shard` is no longer needed by this reader."""
        held = self._held.pop(shard, None)
        if held:
            held.release()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for future in self._pending.values():
            if not future.cancelled() and future.exception() is None:
                future.result().release()
        for held in self._held.values():
            held.release()
        self._pending.clear()
        self._held.clear()


def _mismatch(f, shard: ShardRecord) -> str:
    """Why the downloaded file `f` is not the shard the index describes ('' when it is)."""
    size = f.seek(0, os.SEEK_END)
    if size != shard.bytes:
        return f"{size} bytes, the index says {shard.bytes}"
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(1 << 20):
        h.update(chunk)
    digest = h.hexdigest()
    return "" if digest == shard.sha256 else f"sha256 {digest[:12]}…, the index says {shard.sha256[:12]}…"


def _open_held(path: str, size: int) -> HeldShard | None:
    """The complete shard at `path` under a shared lock; None if it is not there or not `size` bytes long."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    st = os.fstat(fd)
    if st.st_nlink == 0 or st.st_size != size:  # evicted between open and lock, or damaged since
        os.close(fd)
        return None
    return HeldShard(path, fd)


def _remove_unheld(path: str, lock_path: str) -> bool:
    """Delete the shard at `path` if no reader holds it and nobody is downloading it."""
    with _locked(lock_path, wait=False) as downloading_free:
        if not downloading_free:
            return False
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.unlink(path)
        os.close(fd)
        return True


class _locked:
    """An exclusive flock on `path` (created if missing); with wait=False, `as` says whether it was taken."""

    def __init__(self, path: str, wait: bool = True):
        self.path, self.wait, self.fd = path, wait, -1

    def __enter__(self) -> bool:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(self.fd)
            self.fd = -1
            return False
        return True

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
