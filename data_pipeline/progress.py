"""Progress of long operations: a bar with ETA on a terminal, a few log lines elsewhere.

Long loops (writing shards, verifying them, generating and extracting features) take a
`progress` argument, a function like `bar` or `silent`:

    with progress(total, "verify", "shards") as advance:
        for shard in shards:
            ...
            advance(1)

`bar` draws a tqdm bar when standard error is a terminal. When it is not (a Kubernetes pod,
a file, a pipe), it logs one plain line at each tenth of the work and at the end, so logs stay
line-based and short.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

log = logging.getLogger(__name__)

Advance = Callable[[int], None]
Progress = Callable[[int | None, str, str], AbstractContextManager[Advance]]


@contextmanager
def silent(total: int | None, desc: str, unit: str = "it") -> Iterator[Advance]:
    """No output: the default of library calls."""
    yield lambda n=1: None


@contextmanager
def bar(total: int | None, desc: str, unit: str = "it") -> Iterator[Advance]:
    """A tqdm bar on a terminal; otherwise log lines (see _Lines) and one at the end."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=True) as shown:
            yield shown.update
        return
    lines = _Lines(total, desc, unit)
    yield lines.advance
    lines.finish()


class _Lines:
    """Line-based progress, `desc: done/total unit (pct), elapsed, ETA`: a line when another tenth
    is done and at least MIN_GAP seconds passed since the last one, or after MAX_GAP seconds."""

    MIN_GAP, MAX_GAP = 5.0, 30.0

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.started = 0, time.monotonic()
        self.next_tenth, self.last_line = 1, self.started

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.total and self.done >= self.total:
            return  # the closing line says it
        tenth = bool(self.total) and self.done * 10 >= self.next_tenth * self.total
        if (tenth and now - self.last_line >= self.MIN_GAP) or now - self.last_line >= self.MAX_GAP:
            if self.total:
                self.next_tenth = self.done * 10 // self.total + 1
            self._line(now)

    def finish(self) -> None:
        self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last_line = now
        elapsed = now - self.started
        if self.total:
            left = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
            log.info("%s: %d/%d %s (%d%%), %s elapsed, ETA %s", self.desc, self.done, self.total, self.unit,
                     100 * self.done // self.total, clock(elapsed), clock(left))
        else:
            log.info("%s: %d %s, %s elapsed", self.desc, self.done, self.unit, clock(elapsed))


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (or m:ss under an hour); '?' when not known."""
    if seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
