"""Checkpoints in run.dir/checkpoints: atomic, verified, written off the training thread.

Layout: checkpoints/step_XXXXXXXX/{state.pt, COMMITTED}. A checkpoint is written into a
temporary directory, fsynced, and renamed into place; the COMMITTED marker (sizes and sha256
of every file) is written last inside it, so a directory without a valid marker is never
used. Loading goes newest first and falls back, with one warning line, past any checkpoint
that is incomplete, truncated or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn, Protocol

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from trainer.config import Config
    from trainer.distributed import DistEnv

log = logging.getLogger(__name__)


class Checkpointed(Protocol):
    """What a checkpoint takes of a trainer (trainer.core.TrainerBase has it)."""

    env: DistEnv
    state: Any  # .step: the step a checkpoint is named after

    def gather_state(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

NAME = re.compile(r"^step_(\d{8})$")
STATE = "state.pt"
MARKER = "COMMITTED"
TMP, ASIDE = ".tmp-", ".old-"  # a save being written; the copy a save of the same step replaces
LEFTOVER = re.compile(r"^(\.tmp-|\.old-)(step_\d{8})-\d+$")
# Test-only (bench/faults.py): seconds to pause inside every save, half after the state file is
# written and half after the marker, before the rename, so that a kill lands mid-save for sure.
PAUSE_IN_SAVE = "GANFORGE_TEST_PAUSE_IN_SAVE"


def _test_pause(step: int, where: str) -> None:
    """Sleep per GANFORGE_TEST_PAUSE_IN_SAVE (test-only; unset in real runs: no effect)."""
    seconds = float(os.environ.get(PAUSE_IN_SAVE) or 0)
    if seconds > 0:
        log.warning("test pause in the save of step %d, %s", step, where)
        time.sleep(seconds / 2)


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint directory, newest first (valid or not)."""
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d) if (m := NAME.match(n))]
    return sorted(found, reverse=True)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def to_cpu(obj: Any) -> Any:
    """A copy of `obj` whose tensors are detached CPU copies: safe to write while training goes on."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class _OsErrorKeeper:
    """The file object torch.save writes through: keeps the OSError (ENOSPC, EIO) that torch
    reports only as an opaque RuntimeError."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_committed(tmp: str, step: int, state: dict[str, Any]) -> None:
    """state.pt, fsynced, then the COMMITTED marker naming its size and sha256, in directory `tmp`."""
    os.makedirs(tmp)
    state_path = os.path.join(tmp, STATE)
    with open(state_path, "wb") as f:
        keeper = _OsErrorKeeper(f)
        try:
            torch.save(state, keeper)
        except RuntimeError:
            if keeper.error is not None:
                raise keeper.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    _test_pause(step, "state written, no marker")
    marker = {"step": step, "time": time.time(),
              "files": {STATE: {"bytes": os.path.getsize(state_path), "sha256": _sha256(state_path)}}}
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def write_checkpoint(run_dir: str, step: int, state: dict[str, Any]) -> str:
    """Write one checkpoint directory atomically; returns its path."""
    d = checkpoint_dir(run_dir)
    os.makedirs(d, exist_ok=True)
    final = os.path.join(d, f"step_{step:08d}")
    tmp = os.path.join(d, f"{TMP}step_{step:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_committed(tmp, step, state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial save must not keep the disk full
        raise
    _test_pause(step, "committed, not renamed")
    if not os.path.exists(final):
        os.rename(tmp, final)
        _fsync_dir(d)
        return final
    # The same step saved again (e.g. after a resume): swap, so that a valid copy exists at
    # every instant; recover_checkpoints puts the old one back if we die between the renames.
    old = os.path.join(d, f"{ASIDE}{os.path.basename(final)}-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(d)
    shutil.rmtree(old)
    return final


def recover_checkpoints(run_dir: str) -> None:
    """At start (rank 0, run.dir locked): finish or undo saves that a dead process left half done.

    A copy set aside while a step was saved again goes back if the new one never arrived; a
    temporary directory that verifies is a save that died just before its rename and is put
    in place; any other temporary directory is a partial save and is deleted.
    """
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return
    for name in sorted(os.listdir(d)):
        match = LEFTOVER.match(name)
        if not match:
            continue
        path, final = os.path.join(d, name), os.path.join(d, match.group(2))
        if not os.path.exists(final):
            try:
                verify_checkpoint(path)
            except CheckpointError:
                pass
            else:
                os.rename(path, final)
                _fsync_dir(d)
                log.warning("recovered %s from %s, left by an interrupted save", final, name)
                continue
        shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: str) -> str:
    """The state file of a committed, intact checkpoint directory (or a bare .pt file)."""
    if os.path.isfile(path):
        return path
    marker_path = os.path.join(path, MARKER)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    if not os.path.exists(marker_path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    try:
        with open(marker_path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{marker_path}: unreadable marker ({e})") from None
    for name, expect in files.items():
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise CheckpointError(f"{file}: missing")
        size = os.path.getsize(file)
        if size != expect["bytes"]:
            raise CheckpointError(f"{file}: truncated or changed ({size} bytes, marker says {expect['bytes']})")
        if _sha256(file) != expect["sha256"]:
            raise CheckpointError(f"{file}: corrupt (sha256 differs from the marker)")
    return os.path.join(path, STATE)


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load one verified checkpoint (tensors and plain data only: weights_only=True)."""
    state_path = verify_checkpoint(path)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zips and bad pickles raise many kinds
        raise CheckpointError(f"{state_path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{state_path}: not a ganforge checkpoint (no 'step')")
    return state


def load_latest(run_dir: str, warn: bool = True) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint of `run_dir` that verifies and loads; bad newer ones are reported and skipped."""
    skipped = []
    found = None
    for _, path in list_checkpoints(run_dir):
        try:
            found = path, read_checkpoint(path)
            break
        except CheckpointError as e:
            skipped.append(e)
    if warn:
        then = f"using {os.path.basename(found[0])}" if found else \
            f"no valid checkpoint is left in {checkpoint_dir(run_dir)}"
        for e in skipped:
            log.warning("%s; %s", e, then)
    return found


def set_aside_newer(run_dir: str, step: int) -> str | None:
    """Move every checkpoint newer than `step` into checkpoints/abandoned-<time>/ and say so.

    A run that starts from `step` (a rollback with checkpoint.resume=PATH, a fresh start, or a
    fallback past damaged checkpoints) would otherwise mix its saves with another branch's, and
    a later resume=latest would jump to that branch. They are kept, not deleted.
    """
    newer = [path for s, path in list_checkpoints(run_dir) if s > step]
    if not newer:
        return None
    aside = os.path.join(checkpoint_dir(run_dir), time.strftime("abandoned-%Y%m%d-%H%M%S"))
    while os.path.exists(aside):
        aside += "-"
    os.makedirs(aside)
    for path in sorted(newer):
        os.rename(path, os.path.join(aside, os.path.basename(path)))
    _fsync_dir(checkpoint_dir(run_dir))
    log.warning("moved %s aside to %s (newer than step %d, where this run starts; kept, never resumed from "
                "automatically)", ", ".join(os.path.basename(p) for p in sorted(newer)), aside, step)
    return aside


def pick_checkpoint(cfg: Config, env: DistEnv) -> tuple[str, dict[str, Any]] | None:
    """Rank 0 chooses the checkpoint to resume from (checkpoint.resume); every rank loads that same file."""
    choice: list[Any] = [None]
    if env.is_main:
        recover_checkpoints(cfg.run.dir)
        if cfg.checkpoint.resume == "latest":
            found = load_latest(cfg.run.dir)
            choice[0] = found[0] if found else None
        elif cfg.checkpoint.resume != "none":
            choice[0] = cfg.checkpoint.resume
    if env.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    return (choice[0], read_checkpoint(choice[0])) if choice[0] else None


def read_init(location: str) -> tuple[str, dict[str, Any]]:
    """(path, state) of checkpoint.init_from: a run directory (its newest valid checkpoint) or a checkpoint."""
    if os.path.isdir(os.path.join(location, "checkpoints")):
        found = load_latest(location)
        if found is None:
            raise CheckpointError(f"checkpoint.init_from: no valid checkpoint in {location}/checkpoints")
        return found
    return location, read_checkpoint(location)


class CheckpointManager:
    """Decides when to save (`due`), saves on a background thread (one in flight); keeps the newest
    `keep` valid ones plus milestones.

    Retention counts only checkpoints that verify, and never deletes the newest valid one or
    the one this run resumed from, so a damaged or foreign directory cannot push out the only
    usable checkpoint.
    """

    def __init__(self, run_dir: str, keep: int, milestone_every: int = 0, resumed_from: str | None = None, *,
                 every_steps: int = 0, saved_step: int = -1, on_save: Callable[[], None] | None = None):
        self.run_dir, self.keep, self.milestone_every = run_dir, keep, milestone_every
        self.resumed_from = os.path.realpath(resumed_from) if resumed_from else None
        self.every_steps = every_steps  # checkpoint.every_steps: the cadence of due(); 0 = never
        self.saved_step = saved_step  # the newest step on disk or being written (the resumed one at start)
        self.on_save = on_save  # rank 0, right after a save of the run's state started (save_run)
        self._verified: dict[tuple[str, int], bool] = {}  # (path, marker mtime) -> verifies
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_path: str | None = None
        self.last_stall_s = 0.0  # time the training loop was blocked by the last save
        self.last_write_s = 0.0  # time the last write took (in the background)
        self.last_time = 0.0  # wall-clock time of the last completed save

    def due(self, step: int) -> bool:
        """Whether the run saves at `step` by its cadence (it also saves at the end and when stopped)."""
        return self.every_steps > 0 and step % self.every_steps == 0

    def save_run(self, trainer: Checkpointed, blocking: bool = False) -> None:
        """Every rank: checkpoint the trainer at its step, unless that step is saved already.

        Every rank gathers its state (a collective); rank 0 writes it in the background, or,
        with `blocking`, waits until it is on disk while every rank waits at a barrier, so that
        no rank exits (and gets the job torn down) before the save is complete.
        """
        env, step = trainer.env, trainer.state.step
        if step != self.saved_step:
            trainer.gather_state()
            if env.is_main:
                self.save(step, trainer.state_dict(), blocking)
                if self.on_save:
                    self.on_save()
        if blocking:
            if env.is_main:
                self.wait()
            if env.world_size > 1:
                dist.barrier()
        self.saved_step = step

    def raise_failed(self) -> NoReturn:
        """Every rank, once the ranks agree that rank 0's background save failed: rank 0 raises
        its error, the others one that points to it."""
        self.check()
        raise CheckpointError(f"rank 0 could not save a checkpoint in {self.run_dir} (see its error)")

    def save(self, step: int, state: dict[str, Any], blocking: bool = False) -> str:
        t0 = time.perf_counter()
        self.wait()
        snapshot = to_cpu(state)
        path = os.path.join(checkpoint_dir(self.run_dir), f"step_{step:08d}")
        self._thread = threading.Thread(target=self._write, args=(step, path, snapshot), daemon=False,
                                        name="ganforge-checkpoint")
        self._thread.start()
        if blocking:
            self.wait()
        self.last_stall_s = time.perf_counter() - t0
        return path

    def _write(self, step: int, path: str, snapshot: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            self.last_path = write_checkpoint(self.run_dir, step, snapshot)
            self._valid(self.last_path)  # hashed once, here, while the file is in the page cache
            self.last_write_s = time.perf_counter() - t0
            self.last_time = time.time()
            self.prune()
        except BaseException as e:  # noqa: BLE001 - surfaced to the training thread by check() / wait()
            why = f"{e.strerror} (errno {e.errno})" if isinstance(e, OSError) and e.strerror else \
                f"{type(e).__name__}: {e}"
            self._error = CheckpointError(f"{path}: saving the checkpoint of step {step} failed: {why}; "
                                          f"older checkpoints are untouched")

    @property
    def failed(self) -> bool:
        """True once a save has failed in the background (never blocks); check() raises its error."""
        return self._error is not None and (self._thread is None or not self._thread.is_alive())

    def check(self) -> None:
        """Raise the error of a background save that has failed, if any (never blocks)."""
        if self.failed:
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is on disk; re-raise its error, if any."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _valid(self, path: str) -> bool:
        """Whether `path` verifies; each committed version is hashed once per process."""
        try:
            key = (path, os.stat(os.path.join(path, MARKER)).st_mtime_ns)
        except OSError:
            return False
        if key not in self._verified:
            try:
                verify_checkpoint(path)
                self._verified[key] = True
            except CheckpointError:
                self._verified[key] = False
        return self._verified[key]

    def prune(self) -> None:
        """Delete valid checkpoints beyond the newest `keep` valid ones, except milestones and the resumed one.

        Damaged directories are neither counted nor deleted (load_latest reports and skips them).
        """
        kept = 0
        for step, path in list_checkpoints(self.run_dir):
            if (self.milestone_every and step % self.milestone_every == 0) or not self._valid(path):
                continue
            kept += 1
            if kept > max(self.keep, 1) and os.path.realpath(path) != self.resumed_from:
                shutil.rmtree(path, ignore_errors=True)
