"""A local HTTP server for shard directories: range requests, injected latency and faults, server-side counts.

Python's http.server underneath (ThreadingHTTPServer), on 127.0.0.1 only. The tests and
bench/remote.py use it as a stand-in for an object store: every request and every body byte
sent is counted per file, on the server side.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections import Counter, defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
FAULTS = ("500", "503", "reset", "truncate", "stall")


class ShardServer:
    """Serves `root` at `url` until `close`; `fail(name, ...)` queues faults for the next requests of `name`."""

    def __init__(self, root: str, latency_ms: float = 0.0, stall_s: float = 3.0):
        self.root, self.latency_s, self.stall_s = os.path.abspath(root), latency_ms / 1000.0, stall_s
        self.requests: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.faults_served: Counter[str] = Counter()
        self._faults: dict[str, deque[str]] = defaultdict(deque)
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="shard-server")
        self._thread.start()

    def fail(self, name: str, *faults: str) -> None:
        """The next len(faults) requests for `name` get these faults, in order (see FAULTS)."""
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault {sorted(unknown)[0]!r}; choose from {', '.join(FAULTS)}")
        with self._lock:
            self._faults[name].extend(faults)

    def total_bytes(self, suffix: str = ".tar") -> int:
        return sum(n for name, n in self.bytes_sent.items() if name.endswith(suffix))

    def total_requests(self, suffix: str = ".tar") -> int:
        return sum(n for name, n in self.requests.items() if name.endswith(suffix))

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        name = h.path.split("?", 1)[0].lstrip("/")
        path = os.path.join(self.root, name)
        with self._lock:
            self.requests[name] += 1
            fault = self._faults[name].popleft() if self._faults[name] else None
            if fault:
                self.faults_served[fault] += 1
        if self.latency_s:
            time.sleep(self.latency_s)
        if "/" in name or name.startswith(".") or not os.path.isfile(path):
            h.send_error(404)
            return
        if fault == "reset":
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            h.close_connection = True
            h.connection.close()
            return
        if fault in ("500", "503"):
            h.send_error(int(fault))
            return
        size = os.path.getsize(path)
        start, end = 0, size - 1
        match = RANGE.match(h.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            end = min(size - 1, int(match.group(2))) if match.group(2) else size - 1
            if start >= size:
                h.send_error(416)
                return
        length = end - start + 1
        h.send_response(206 if match else 200)
        h.send_header("Content-Length", str(length))
        h.send_header("Accept-Ranges", "bytes")
        if match:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if fault == "stall":
            time.sleep(self.stall_s)
        if fault == "truncate":
            length //= 2
            h.close_connection = True
        with open(path, "rb") as f:
            f.seek(start)
            sent = _copy(f, h.wfile, length)
        with self._lock:
            self.bytes_sent[name] += sent

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _copy(src, dst, length: int) -> int:
    sent = 0
    try:
        while sent < length:
            chunk = src.read(min(1 << 20, length - sent))
            if not chunk:
                break
            dst.write(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sent


def copy_dataset(src: str, dst: str) -> str:
    """A copy of a shard directory (index.json and its shards) to serve."""
    shutil.copytree(src, dst)
    return dst
