"""Check shards against their index: presence, size, sha256, tar members, per-member crc32, and
that every sample decodes as the index metadata says (image size and bit depth, labels)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.index import ShardIndex, ShardRecord
from data_pipeline.progress import Progress, silent


def verify_shard(data: bytes, shard: ShardRecord) -> list[str]:
    """Problems of one shard's bytes, each naming the shard (and key where one is affected)."""
    problems = []
    if len(data) != shard.bytes:
        problems.append(f"{shard.name}: size {len(data)} bytes, index says {shard.bytes}")
    for rec in shard.samples:
        for ext, (offset, size, crc) in rec.members.items():
            payload = data[offset:offset + size]
            if len(payload) != size:
                problems.append(f"{shard.name}: key {rec.key}: member .{ext} truncated")
            elif zlib.crc32(payload) != crc:
                problems.append(f"{shard.name}: key {rec.key}: member .{ext} content differs from the index")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            names = {m.name for m in tar.getmembers()}
    except (tarfile.TarError, EOFError) as e:
        problems.append(f"{shard.name}: not a readable tar ({e})")
    else:
        expected = {f"{r.key}.{ext}" for r in shard.samples for ext in r.members}
        for name in sorted(expected - names)[:1]:
            problems.append(f"{shard.name}: key {name.split('.', 1)[0]}: member {name} missing from the tar")
        for name in sorted(names - expected)[:1]:
            problems.append(f"{shard.name}: key {name.split('.', 1)[0]}: member {name} not in the index")
    if not problems and hashlib.sha256(data).hexdigest() != shard.sha256:
        # Bytes outside any payload changed (tar headers or padding).
        problems.append(f"{shard.name}: sha256 differs from the index (tar header or padding bytes changed)")
    return problems


def decode_problems(data: bytes, shard: ShardRecord, kind: str, meta: dict[str, Any]) -> list[str]:
    """Samples of an intact shard that disagree with the index metadata (image size, bit depth, label)."""
    from data_pipeline.loader import decode_sample

    problems = []
    for rec in shard.samples:
        members = {ext: data[offset:offset + size] for ext, (offset, size, _) in rec.members.items()}
        try:
            decode_sample(kind, meta, members)
        except DataError as e:
            problems.append(f"{shard.name}: key {rec.key}: {e}")
        except Exception as e:  # noqa: BLE001 - a decoder raises many kinds
            problems.append(f"{shard.name}: key {rec.key}: cannot decode ({type(e).__name__}: {e})")
    return problems


def verify_index(index: ShardIndex, progress: Progress = silent) -> list[str]:
    """All problems of a local dataset; an empty list means every shard matches its index."""
    problems = []
    with progress(len(index.shards), "verify", "shards") as advance:
        for shard in index.shards:
            path = index.shard_path(shard)
            if not os.path.exists(path):
                problems.append(f"{shard.name}: missing shard file {path}")
                continue
            with open(path, "rb") as f:
                data = f.read()
            found = verify_shard(data, shard)
            if not found:
                found = decode_problems(data, shard, index.kind, index.meta)
            problems += found
            advance(1)
    return problems
