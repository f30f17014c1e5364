"""Bytes from http(s):// (urllib3) and s3:// (boto3) locations, with bounded, counted retries.

urllib3 (the connection pool under `requests`) gives pooled keep-alive connections, range
requests, timeouts and a check of the body against Content-Length; boto3 finds S3 credentials,
region and a custom endpoint as the AWS tools do. Both run with their own retries off: the
retry policy is ours, so that every retry is counted and an interrupted body resumes where it
stopped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import BinaryIO
from urllib.parse import urlsplit, urlunsplit

import urllib3

from data_pipeline.errors import DataError
from data_pipeline.redact import redact_url

ATTEMPTS = 8  # first try plus seven retries
BACKOFF_S = 0.2  # doubled after each failed attempt ...
BACKOFF_MAX_S = 4.0  # ... up to this: 14.2 s of waiting in all before a DataError
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
    return location.startswith(("http://", "https://", "s3://"))


class _Retry(Exception):
    """A failed attempt worth another one; the message says why."""


class RemoteClient:
    """One process's connections (urllib3 pool, boto3 S3 client); rebuilt after a fork, never shared."""

    def __init__(self, stats: FetchStats | None = None, attempts: int = ATTEMPTS, backoff_s: float = BACKOFF_S,
                 timeout_s: float = TIMEOUT_S):
        self.stats = stats if stats is not None else FetchStats()
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self._pool: urllib3.PoolManager | None = None
        self._s3 = None
        self._pid = -1

    def _connections(self) -> None:
        if self._pid != os.getpid():
            self._pool = urllib3.PoolManager(num_pools=4, maxsize=8, retries=False,
                                             timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s))
            self._s3, self._pid = None, os.getpid()

    def download(self, url: str, out: BinaryIO, size: int | None = None, what: str = "") -> int:
        """Write the object at `url` into `out` (empty, seekable); returns its length.

        5xx, 408, 429 (S3: also throttling), timeouts, connection resets and bodies that end
        early are retried with exponential backoff, resuming by a range request where the
        server allows it; after ATTEMPTS tries, or at once for another status (404, 403, ...),
        a DataError names `what` and the URL without its credentials.
        """
        label = f"{what}: " if what else ""
        received, last = 0, ""
        t0 = time.perf_counter()
        self._connections()
        try:
            for attempt in range(self.attempts):
                if attempt:
                    self.stats.add(retries=1)
                    time.sleep(min(BACKOFF_MAX_S, self.backoff_s * 2 ** (attempt - 1)))
                self.stats.add(requests=1)
                try:
                    chunks, restarted = self._open(url, received, label)
                except _Retry as e:
                    last = str(e)
                    continue
                if restarted:  # the server ignored the range: start over
                    out.seek(0)
                    out.truncate()
                    received = 0
                try:
                    for chunk in chunks:
                        out.write(chunk)
                        received += len(chunk)
                        self.stats.add(bytes_fetched=len(chunk))
                except _Retry as e:
                    last = f"{e} after {received} bytes"
                    continue
                if size is None or received >= size:
                    return received
                last = f"body ended after {received} of {size} bytes"
        finally:
            self.stats.add(fetch_seconds=time.perf_counter() - t0)
        raise DataError(f"{label}cannot fetch {redact_url(url)} after {self.attempts} attempts ({last})")

    def _open(self, url: str, start: int, label: str) -> tuple[Iterator[bytes], bool]:
        """The body of `url` from byte `start` as chunks, and whether it restarts from byte 0."""
        if url.startswith("s3://"):
            return self._open_s3(url, start, label)
        target, headers = _split_credentials(url)
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            response = self._pool.request("GET", target, headers=headers, preload_content=False)
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise _Retry(_reason(e)) from None
        if response.status in RETRY_STATUS:
            response.release_conn()
            raise _Retry(f"HTTP {response.status}")
        if response.status not in (200, 206):
            response.release_conn()
            raise DataError(f"{label}cannot fetch {redact_url(url)} (HTTP {response.status})")
        return _http_chunks(response), bool(start) and response.status == 200

    def _open_s3(self, url: str, start: int, label: str) -> tuple[Iterator[bytes], bool]:
        """S3 GetObject through boto3: credentials, region and endpoint (AWS_ENDPOINT_URL) as the AWS tools find them."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, _, key = url[len("s3://"):].partition("/")
        ranged = {"Range": f"bytes={start}-"} if start else {}
        try:
            response = self._s3_client().get_object(Bucket=bucket, Key=key, **ranged)
        except ClientError as e:
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            code = e.response.get("Error", {}).get("Code", "")
            if status in RETRY_STATUS or code in ("SlowDown", "Throttling", "RequestTimeout"):
                raise _Retry(f"S3 {code or status}") from None
            raise DataError(f"{label}cannot fetch {redact_url(url)} (S3 {code or status})") from None
        except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
            raise _Retry(type(e).__name__) from None
        return _s3_chunks(response["Body"]), False

    def _s3_client(self):
        if self._s3 is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise DataError("s3:// locations need boto3: pip install 'ganforge[s3]'") from None
            config = Config(retries={"total_max_attempts": 1}, connect_timeout=self.timeout_s,
                            read_timeout=self.timeout_s, max_pool_connections=8)
            self._s3 = boto3.session.Session().client("s3", config=config)
        return self._s3


def _http_chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    try:
        yield from response.stream(CHUNK)
    except (urllib3.exceptions.HTTPError, OSError) as e:
        raise _Retry(_reason(e)) from None
    finally:
        response.release_conn()


def _s3_chunks(body) -> Iterator[bytes]:
    from botocore.exceptions import BotoCoreError

    try:
        yield from body.iter_chunks(CHUNK)
    except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
        raise _Retry(type(e).__name__) from None
    finally:
        body.close()


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
