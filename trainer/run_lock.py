"""One job per run.dir: rank 0 holds an exclusive lock on run.dir/LOCK while the job runs.

A second job on the same run.dir would delete the first one's in-flight save and continue its
MLflow run. The lock is an flock(2) on the file, so it goes away with its holder whatever the
way it died; the file names the holder (host, pid, start time) for the refusal message, and
a file left by a holder that is gone is taken over with a warning.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

from trainer.checkpoint import CheckpointError
from trainer.distributed import DistEnv, stop_votes

log = logging.getLogger(__name__)

NAME = "LOCK"


class RunLock:
    """The lock of one run.dir, held by this process once acquire() returned without error."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, NAME)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise CheckpointError naming its holder."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                os.close(fd)
                raise CheckpointError(f"{os.path.dirname(self.path)} is in use by another job ({holder}); "
                                      f"give each job its own run.dir, or stop that one first") from None
            except OSError as e:  # a filesystem without locks: run, but say that nothing guards run.dir
                os.close(fd)
                log.warning("cannot lock %s (%s); nothing stops a second job on this run.dir", self.path, e.strerror)
                return
            # The holder may have removed the file between our open and our flock: retry on the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = _read(fd)
        if left:
            log.warning("taking over the lock on %s left by %s, which is gone", os.path.dirname(self.path),
                        _describe(left))
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the file, then let go of the lock (a job waiting on the old file retries on a new one)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"


def lock_run_dir(run_dir: str, env: DistEnv) -> RunLock | None:
    """Rank 0 locks run.dir; every rank raises CheckpointError when another job holds it."""
    lock, refusal = None, None
    if env.is_main:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except CheckpointError as e:
            lock, refusal = None, e
    if stop_votes([refusal is not None], env)[0]:
        raise refusal or CheckpointError(f"rank 0 could not lock {run_dir} (see its error)")
    return lock
