"""Bytes from http(s):// locations through urllib3, with bounded, counted retries.

urllib3 (the connection pool under `requests`) gives pooled keep-alive connections, range
requests, timeouts and a check of the body against Content-Length; the retry policy is ours
so that every retry is counted and an interrupted body resumes where it stopped.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, fields
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import urllib3

from data_pipeline.errors import DataError
from data_pipeline.redact import redact_url

ATTEMPTS = 6  # first try plus five retries
BACKOFF_S = 0.2  # doubled after each failed attempt ...
BACKOFF_MAX_S = 4.0  # ... up to this: about 12 s of waiting before a DataError
TIMEOUT_S = 60.0  # connect, and between two reads of a body
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CHUNK = 1 << 20


@dataclass
class FetchStats:
    """Counters of one process's remote reads (summed over its threads)."""

    bytes_fetched: int = 0
    requests: int = 0
    retries: int = 0
    fetch_seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **counts: float) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def take(self) -> dict[str, float]:
        """The counts since the last take (a loader worker ships them with each batch)."""
        with self._lock:
            out = {f.name: getattr(self, f.name) for f in fields(self)}
            for f in fields(self):
                setattr(self, f.name, type(getattr(self, f.name))())
        return out


def is_remote(location: str) -> bool:
    """A location this module fetches (as opposed to a local path or a `pipe:` command)."""
    return location.startswith(("http://", "https://"))


class HttpClient:
    """One process's connection pool; rebuilt after a fork (a pool is never shared across processes)."""

    def __init__(self, stats: FetchStats | None = None, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S,
                 timeout_s: float = TIMEOUT_S):
        self.stats = stats if stats is not None else FetchStats()
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self._pool: urllib3.PoolManager | None = None
        self._pid = -1

    def _manager(self) -> urllib3.PoolManager:
        if self._pid != os.getpid():
            self._pool = urllib3.PoolManager(num_pools=4, maxsize=8, retries=False,
                                             timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s))
            self._pid = os.getpid()
        return self._pool

    def download(self, url: str, out: BinaryIO, size: int | None = None, what: str = "") -> int:
        """Write the body at `url` into `out` (empty, seekable); returns its length.

        5xx, 408, 429, timeouts, connection resets and bodies that end early are retried with
        exponential backoff, resuming by a range request where the server allows it; after
        ATTEMPTS tries, or at once for another status (404, 403, ...), a DataError names
        `what` and the URL without its credentials.
        """
        target, headers = _split_credentials(url)
        label = f"{what}: " if what else ""
        received, last = 0, ""
        t0 = time.perf_counter()
        try:
            for attempt in range(self.attempts):
                if attempt:
                    self.stats.add(retries=1)
                    time.sleep(min(BACKOFF_MAX_S, self.backoff_s * 2 ** (attempt - 1)))
                ranged = {"Range": f"bytes={received}-"} if received else {}
                try:
                    self.stats.add(requests=1)
                    response = self._manager().request("GET", target, headers=headers | ranged, preload_content=False)
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    last = _reason(e)
                    continue
                try:
                    if response.status == 200 and received:  # the server ignored the range: start over
                        out.seek(0)
                        out.truncate()
                        received = 0
                    elif response.status in RETRY_STATUS:
                        last = f"HTTP {response.status}"
                        continue
                    elif response.status not in (200, 206):
                        raise DataError(f"{label}cannot fetch {redact_url(url)} (HTTP {response.status})")
                    for chunk in response.stream(CHUNK):
                        out.write(chunk)
                        received += len(chunk)
                        self.stats.add(bytes_fetched=len(chunk))
                except (urllib3.exceptions.HTTPError, OSError) as e:
                    last = f"{_reason(e)} after {received} bytes"
                    continue
                finally:
                    response.release_conn()
                if size is None or received >= size:
                    return received
                last = f"body ended after {received} of {size} bytes"
        finally:
            self.stats.add(fetch_seconds=time.perf_counter() - t0)
        raise DataError(f"{label}cannot fetch {redact_url(url)} after {self.attempts} attempts ({last})")


def _reason(error: Exception) -> str:
    """A short cause for a failed attempt, without the URL (urllib3 puts the full one in its messages)."""
    cause = getattr(error, "reason", None) or error
    return type(cause).__name__


def _split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """`url` without `user:password@`, and the Authorization header that carries them instead."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, {}
    userinfo, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=host)), urllib3.util.make_headers(basic_auth=userinfo)
