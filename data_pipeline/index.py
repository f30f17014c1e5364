"""The shard index: `index.json` beside the tar shards (format documented in docs/data.md)."""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.remote import RemoteClient, is_remote

INDEX_NAME = "index.json"
FORMAT = "ganforge.shards"
VERSION = 1
# A shard is a plain file beside index.json: no path separators, no "..", nothing a shell reads.
SHARD_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
# Characters that make a `pipe:` command need a shell; without them it runs as an argument list.
SHELL_SYNTAX = frozenset("|&;<>()$`\\*?[]{}~#!\n")


@dataclass(frozen=True)
class SampleRecord:
    """One sample: its key and, per member extension, (offset, size, crc32) of the payload in the tar."""

    key: str
    members: dict[str, tuple[int, int, int]]


@dataclass(frozen=True)
class ShardRecord:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    samples: tuple[SampleRecord, ...]


@dataclass
class ShardIndex:
    """All shards of one dataset, addressable by a global sample number 0..num_samples-1."""

    root: str
    kind: str
    meta: dict[str, Any]
    shards: list[ShardRecord]
    _starts: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        total, self._starts = 0, []
        for shard in self.shards:
            self._starts.append(total)
            total += shard.num_samples

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def locate(self, sample: int) -> tuple[ShardRecord, SampleRecord]:
        """The shard and record of global sample number `sample`."""
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"sample {sample} outside 0..{self.num_samples - 1}")
        s = bisect.bisect_right(self._starts, sample) - 1
        return self.shards[s], self.shards[s].samples[sample - self._starts[s]]

    def shard_of(self, sample: int) -> int:
        return bisect.bisect_right(self._starts, sample) - 1

    def shard_path(self, shard: ShardRecord) -> str:
        return join_location(self.root, shard.name)

    def keys(self) -> list[str]:
        return [rec.key for shard in self.shards for rec in shard.samples]

    def fingerprint(self) -> str:
        """A short hash of the shard contents, stable across copies of the dataset."""
        h = hashlib.sha256()
        for shard in self.shards:
            h.update(f"{shard.name}:{shard.sha256};".encode())
        return h.hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "meta": self.meta,
            "num_samples": self.num_samples,
            "shards": [
                {
                    "name": s.name,
                    "num_samples": s.num_samples,
                    "bytes": s.bytes,
                    "sha256": s.sha256,
                    "samples": [
                        {"key": r.key, "members": {k: list(v) for k, v in r.members.items()}}
                        for r in s.samples
                    ],
                }
                for s in self.shards
            ],
        }

    def write(self, directory: str) -> str:
        """Write index.json atomically into `directory`; returns its path."""
        path = os.path.join(directory, INDEX_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def parse_label(payload: bytes, label_names: list[str] | None) -> int:
    """A `cls` member as an integer in 0..len(label_names)-1 (or >= 0 without names); else DataError."""
    try:
        label = int(payload)
    except ValueError:
        raise DataError(f"label {payload[:20].decode(errors='replace')!r} is not an integer") from None
    if label < 0 or (label_names and label >= len(label_names)):
        span = f"the dataset's {len(label_names)} label names" if label_names else "labels >= 0"
        raise DataError(f"label {label} is outside {span}")
    return label


def is_url(location: str) -> bool:
    return "://" in location or location.startswith("pipe:")


def join_location(root: str, name: str) -> str:
    if is_url(root):
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def parse_index(doc: Any, root: str, source: str) -> ShardIndex:
    """Validate a decoded index.json document; `source` names it in errors."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{source}: not a ganforge shard index (missing format={FORMAT!r})")
    if doc.get("version") != VERSION:
        raise DataError(f"{source}: unsupported index version {doc.get('version')!r}")
    try:
        shards = [
            ShardRecord(
                name=s["name"],
                num_samples=int(s["num_samples"]),
                bytes=int(s["bytes"]),
                sha256=s["sha256"],
                samples=tuple(
                    SampleRecord(r["key"], {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in r["members"].items()})
                    for r in s["samples"]
                ),
            )
            for s in doc["shards"]
        ]
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DataError(f"{source}: malformed index entry ({type(e).__name__}: {e})") from None
    for s in shards:
        if not isinstance(s.name, str) or not SHARD_NAME.fullmatch(s.name):
            raise DataError(f"{source}: shard name {s.name!r} is not a plain file name "
                            "(letters, digits, '.', '_', '-'; not starting with '.')")
        if len(s.samples) != s.num_samples:
            raise DataError(f"{source}: shard {s.name} lists {len(s.samples)} samples, says {s.num_samples}")
    index = ShardIndex(root=root, kind=doc.get("kind", "image"), meta=doc.get("meta", {}), shards=shards)
    if index.num_samples == 0:
        raise DataError(f"{source}: empty dataset (no samples in any shard)")
    return index


def load_index(location: str) -> ShardIndex:
    """Read the index of a shard directory or URL prefix (the index is fetched alongside)."""
    if location.endswith(".json"):
        index_path, root = location, location.rsplit("/", 1)[0] if "/" in location else "."
    else:
        index_path, root = join_location(location, INDEX_NAME), location
    if is_url(index_path):
        raw = _read_url(index_path)
    else:
        if not os.path.isdir(root):
            raise DataError(f"{root}: no such shard directory")
        if not os.path.exists(index_path):
            raise DataError(f"{index_path}: missing index (write shards with `ganforge data make-shards`)")
        with open(index_path, "rb") as f:
            raw = f.read()
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{index_path}: index is not valid JSON ({e})") from None
    return parse_index(doc, root, index_path)


def _read_url(url: str) -> bytes:
    return read_location(url)


def read_location(location: str) -> bytes:
    """The bytes at a URL or `pipe:` location; a pipe command runs without a shell unless it uses shell syntax.

    http(s) goes through data_pipeline.remote (retried, counted); other URL schemes through
    webdataset's opener (its command-line clients: gs://, s3:// with `aws`, ...).
    """
    if location.startswith("pipe:"):
        return _read_pipe(location[len("pipe:"):], location)
    if is_remote(location):
        body = io.BytesIO()
        RemoteClient().download(location, body)
        return body.getvalue()
    import webdataset as wds

    try:
        with wds.gopen(location, "rb") as stream:
            return stream.read()
    except Exception as e:  # noqa: BLE001 - the opener raises many kinds
        raise DataError(f"{location}: cannot fetch ({type(e).__name__}: {e})") from None


def _read_pipe(command: str, location: str) -> bytes:
    try:
        args = shlex.split(command)
    except ValueError:
        args = []
    needs_shell = not args or any(c in SHELL_SYNTAX for c in command) or "=" in args[0]
    try:
        if needs_shell:
            done = subprocess.run(command, shell=True, capture_output=True, check=False)  # noqa: S602
        else:
            done = subprocess.run(args, capture_output=True, check=False)
    except OSError as e:
        raise DataError(f"{location}: cannot fetch ({e.strerror}: {args[0] if args else command})") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise DataError(f"{location}: cannot fetch (command exited with status {done.returncode}"
                        f"{': ' + err[-1] if err else ''})")
    return done.stdout
