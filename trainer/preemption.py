"""Graceful preemption: SIGTERM/SIGINT ask for a checkpoint at the next step boundary.

Every rank checks the flag at each step boundary through one all-reduce, so all ranks stop
at the same step, rank 0 writes one checkpoint, and the job exits with EXIT_PREEMPTED,
which torchrun restarts and Kubernetes retries. A second signal exits at once; one that
arrives within a second of the first is taken as the same request (Ctrl-C reaches every
process of the group directly *and* through the launcher, which forwards it).
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.core import TrainerBase

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a container killed by SIGTERM reports


class Preempted(Exception):
    """Raised once the checkpoint for a requested stop is on disk."""

    def __init__(self, step: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step} after checkpointing")
        self.step, self.signum = step, signum


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop reads `requested` at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = 0
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            if time.monotonic() - self._first_at > 1.0:  # a real second signal: exit now
                os._exit(128 + signum)
            return
        self.requested, self.signum, self._first_at = True, signum, time.monotonic()
        log.warning("%s received; checkpointing at the next step boundary (send again to exit at once)",
                    signal.Signals(signum).name)


def data_marks(trainer: TrainerBase) -> list[tuple[Any, dict[str, int]]]:
    """The positions of the trainer's data cursors at a step boundary (see rewind_after_lost_worker)."""
    return [(c, c.state_dict()) for c in trainer.datasets()]


LOST_WORKER_ERRORS = (RuntimeError, ConnectionError, EOFError)


def lost_worker(error: BaseException) -> bool:
    """Whether `error` is how a DataLoader reports a worker that died: its own RuntimeError, or a
    broken connection while it took a batch from that worker (a batch's shared memory is handed
    over through a socket the worker holds, so a worker killed mid-delivery resets it)."""
    if isinstance(error, RuntimeError):
        return str(error).startswith("DataLoader worker (pid")
    if isinstance(error, (ConnectionError, EOFError)):
        return any(frame.name == "_try_get_data" for frame in traceback.extract_tb(error.__traceback__))
    return False


def rewind_after_lost_worker(error: BaseException, marks: list[tuple[Any, dict[str, int]]]) -> bool:
    """Put the cursors back to `marks` when `error` is a loader worker's death before the step took a batch.

    A worker can die during a stop (a signal to the process group before the worker could
    ignore it, or the launcher's SIGKILL). The loader reports it at a fetch (see
    data_pipeline.loader.StopSafeLoader); if that was the step's first fetch, nothing of the
    step has run (every trainer fetches before it updates), so the step can run again on
    fresh workers from the same position, which is one integer, exactly. False otherwise.
    """
    if not lost_worker(error):
        return False
    for cursor, mark in marks:
        now = cursor.state_dict()
        # consumed grows by one batch per fetch; an epoch rolled over without a batch restarts at 0
        if now["consumed"] != (mark["consumed"] if now["epoch"] == mark["epoch"] else 0) \
                or now["epoch"] - mark["epoch"] not in (0, 1):
            return False
    for cursor, mark in marks:
        cursor.load_state_dict(mark)  # the next fetch starts fresh workers at this position
    return True
