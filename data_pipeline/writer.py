"""Write samples into `NNNNNN.tar` shards and record every member's byte offset in index.json."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Iterable
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.index import INDEX_NAME, SampleRecord, ShardIndex, ShardRecord

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: payload})


def _check_key(key: str) -> None:
    # WebDataset splits "key.ext" at the first dot of the file name: keys must not hold one.
    if not key or "." in key or "/" in key:
        raise DataError(f"invalid sample key {key!r}: must be non-empty, without '.' or '/'")


def _write_tar(path: str, samples: list[Sample]) -> ShardRecord:
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                info.uname = info.gname = "ganforge"
                tar.addfile(info, io.BytesIO(payload))
    with open(tmp, "rb") as f:
        data = f.read()
    records: dict[str, dict[str, tuple[int, int, int]]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            payload = data[m.offset_data:m.offset_data + m.size]
            records.setdefault(key, {})[ext] = (m.offset_data, m.size, zlib.crc32(payload))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return ShardRecord(
        name=os.path.basename(path),
        num_samples=len(samples),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        samples=tuple(SampleRecord(key, records[key]) for key, _ in samples),
    )


def write_shards(
    samples: Iterable[Sample],
    out_dir: str,
    *,
    kind: str,
    meta: dict[str, Any],
    samples_per_shard: int = 1000,
    force: bool = False,
    progress: bool = False,
) -> ShardIndex:
    """Write `samples` as shards of at most `samples_per_shard` into `out_dir`, then index.json.

    The index is written last, so a directory with an index is complete. An existing dataset
    in `out_dir` is never overwritten unless `force` is set.
    """
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    existing = [n for n in os.listdir(out_dir) if n.endswith(".tar") or n == INDEX_NAME]
    if existing and not force:
        raise DataError(f"{out_dir}: already holds a dataset ({existing[0]}); pass --force to replace it")
    for name in existing:
        os.remove(os.path.join(out_dir, name))
    shards: list[ShardRecord] = []
    pending: list[Sample] = []
    seen: set[str] = set()

    def flush() -> None:
        shards.append(_write_tar(os.path.join(out_dir, f"{len(shards):06d}.tar"), pending))
        pending.clear()
        if progress:
            print(f"  wrote {shards[-1].name}: {shards[-1].num_samples} samples, "
                  f"{shards[-1].bytes / 1e6:.2f} MB", flush=True)

    for key, members in samples:
        _check_key(key)
        if key in seen:
            raise DataError(f"duplicate sample key {key!r}")
        seen.add(key)
        pending.append((key, members))
        if len(pending) == samples_per_shard:
            flush()
    if pending:
        flush()
    if not shards:
        raise DataError(f"{out_dir}: no samples to write (empty source)")
    index = ShardIndex(root=out_dir, kind=kind, meta=meta, shards=shards)
    index.write(out_dir)
    return index
