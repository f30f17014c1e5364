"""Checkpoints in run.dir/checkpoints: atomic writes, newest-valid resume, retention."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

import torch

NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every checkpoint file, newest first."""
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return []
    found = [(int(m.group(1)), os.path.join(d, n)) for n in os.listdir(d) if (m := NAME.match(n))]
    return sorted(found, reverse=True)


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], keep: int) -> str:
    """Write `state` to checkpoints/step_XXXXXXXX.pt via a temp file, fsync and rename; prune old ones."""
    d = checkpoint_dir(run_dir)
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, f"step_{step:08d}.pt")
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for _, old in list_checkpoints(run_dir)[keep:]:
        os.remove(old)
    return path


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load one checkpoint (tensors and plain data only: weights_only=True)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # noqa: BLE001 - truncated zips and bad pickles raise many kinds
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path}: not a ganforge checkpoint (no 'step')")
    return state


def load_latest(run_dir: str, warn: bool = True) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint of `run_dir` that loads; unreadable newer ones are reported and skipped."""
    for _, path in list_checkpoints(run_dir):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            if warn:
                print(f"ganforge: warning: {e}; trying the previous checkpoint", file=sys.stderr, flush=True)
    return None
