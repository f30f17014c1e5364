"""Write samples into `NNNNNN.tar` shards and record every member's byte offset in index.json."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import tarfile
import tempfile
import zlib
from collections.abc import Iterable
from typing import Any

from data_pipeline.errors import DataError
from data_pipeline.index import INDEX_NAME, SampleRecord, ShardIndex, ShardRecord, parse_label
from data_pipeline.progress import Advance, Progress, silent

Sample = tuple[str, dict[str, bytes]]  # (key, {extension: payload})
BUILD_MARK = ".make-shards-"  # <parent>/.<name>.make-shards-XXXX: a dataset being built
ASIDE_MARK = ".replaced"  # <parent>/.<name>.replaced: the old dataset during the swap


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
    progress: Progress = silent,
    total: int | None = None,
) -> ShardIndex:
    """Write `samples` as shards of at most `samples_per_shard` into `out_dir`, then index.json.

    The dataset is built in a folder beside `out_dir` and swapped in at the end, so a dataset
    already there survives any failure of the source. An existing dataset in `out_dir` is never
    replaced unless `force` is set. `progress` (e.g. data_pipeline.progress.bar) shows the samples
    written out of `total`, when the caller knows it.
    """
    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    target = os.path.realpath(out_dir)  # a symlinked --out keeps pointing where it did
    _recover_swap(target)
    existing = _dataset_files(target)
    if existing and not force:
        raise DataError(f"{out_dir}: already holds a dataset ({existing[0]}); pass --force to replace it")
    build = _build_dir(target)
    try:
        with progress(total, "make-shards", "samples") as advance:
            index = _write_into(samples, build, kind=kind, meta=meta, samples_per_shard=samples_per_shard,
                                advance=advance, label=out_dir)
        _swap_in(build, target)
    finally:
        if os.path.isdir(build):
            shutil.rmtree(build, ignore_errors=True)
    return ShardIndex(root=out_dir, kind=index.kind, meta=index.meta, shards=index.shards)


def _dataset_files(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if n.endswith(".tar") or n == INDEX_NAME)


def _build_dir(out_dir: str) -> str:
    """A fresh folder beside `out_dir` (same filesystem, so the final swap is a rename)."""
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    try:
        build = tempfile.mkdtemp(prefix=f".{name}{BUILD_MARK}{socket.gethostname()}-{os.getpid()}-", dir=parent)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create a build folder beside it in {parent} ({e.strerror})") from None
    if os.path.isdir(out_dir):
        mode = os.stat(out_dir).st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o777 & ~umask
    os.chmod(build, mode)  # mkdtemp's 0700 would hide the dataset from other users
    return build


def _aside_name(out_dir: str) -> str:
    parent, name = os.path.split(out_dir)
    return os.path.join(parent, f".{name}{ASIDE_MARK}")


def _is_dataset_file(name: str) -> bool:
    return name.endswith((".tar", ".tar.tmp")) or name in (INDEX_NAME, INDEX_NAME + ".tmp")


def _swap_in(build: str, out_dir: str) -> None:
    """Old dataset aside, new one in, then delete the old; files of other kinds in out_dir move over."""
    if not os.path.exists(out_dir):
        os.rename(build, out_dir)
        return
    aside = _aside_name(out_dir)
    if os.path.exists(aside):
        shutil.rmtree(aside)
    try:
        os.rename(out_dir, aside)
    except OSError:  # a mount point (EBUSY) or a parent we may not rename in: swap file by file
        _swap_files(build, out_dir)
        return
    os.rename(build, out_dir)
    for name in os.listdir(aside):  # anything the user keeps beside the shards stays with them
        if not _is_dataset_file(name):
            os.rename(os.path.join(aside, name), os.path.join(out_dir, name))
    shutil.rmtree(aside)


def _swap_files(build: str, out_dir: str) -> None:
    """Replace the dataset inside `out_dir`: the old index goes first and the new one comes last."""
    old = [n for n in os.listdir(out_dir) if _is_dataset_file(n)]
    for name in sorted(old, key=lambda n: n != INDEX_NAME):
        os.remove(os.path.join(out_dir, name))
    new = sorted(os.listdir(build), key=lambda n: n == INDEX_NAME)
    for name in new:
        shutil.move(os.path.join(build, name), os.path.join(out_dir, name))


def _recover_swap(out_dir: str) -> None:
    """Finish or undo a swap that a death interrupted, and drop build folders of dead writers."""
    parent, name = os.path.split(out_dir)
    aside = _aside_name(out_dir)
    if os.path.isdir(aside):
        if os.path.exists(out_dir):
            shutil.rmtree(aside)  # the new dataset was already in place
        else:
            os.rename(aside, out_dir)  # died between the two renames: the old dataset comes back
    prefix = f".{name}{BUILD_MARK}"
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            if entry.startswith(prefix) and not _writer_alive(entry[len(prefix):]):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _writer_alive(tag: str) -> bool:
    """Whether the writer of a build folder tagged `<host>-<pid>-<random>` may still be running."""
    host = socket.gethostname()
    if not tag.startswith(host + "-"):
        return True  # another machine's writer on a shared filesystem: not ours to judge
    try:
        os.kill(int(tag[len(host) + 1:].split("-")[0]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):
        return True
    return True


def _write_into(
    samples: Iterable[Sample], out_dir: str, *, kind: str, meta: dict[str, Any],
    samples_per_shard: int, advance: Advance, label: str,
) -> ShardIndex:
    shards: list[ShardRecord] = []
    pending: list[Sample] = []
    seen: set[str] = set()

    def flush() -> None:
        shards.append(_write_tar(os.path.join(out_dir, f"{len(shards):06d}.tar"), pending))
        advance(len(pending))
        pending.clear()

    label_names = meta.get("label_names")
    for key, members in samples:
        _check_key(key)
        if "cls" in members:
            try:
                parse_label(members["cls"], label_names)
            except DataError as e:
                raise DataError(f"key {key}: {e}") from None
        if key in seen:
            raise DataError(f"duplicate sample key {key!r}")
        seen.add(key)
        pending.append((key, members))
        if len(pending) == samples_per_shard:
            flush()
    if pending:
        flush()
    if not shards:
        raise DataError(f"{label}: no samples to write (empty source)")
    index = ShardIndex(root=out_dir, kind=kind, meta=meta, shards=shards)
    index.write(out_dir)
    return index
