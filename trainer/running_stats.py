"""Normalisation running statistics (BatchNorm's running mean/var and count): kept apart from a skipped step.

A step skipped for a non-finite loss or gradient leaves the weights alone, but its forward
passes have already folded the bad batch into the running statistics, which are then averaged
over ranks, copied into the EMA and checkpointed. The trainer snapshots these few small
buffers before a step and puts them back when the step is skipped.
"""

from __future__ import annotations

import torch
from torch import nn

NAMES = ("running_mean", "running_var", "num_batches_tracked")


def running_stats(*modules: nn.Module) -> list[torch.Tensor]:
    """The running-statistics buffers of `modules` (BatchNorm, SyncBatchNorm, tracked InstanceNorm)."""
    return [b for m in modules for name, b in m.named_buffers() if name.rsplit(".", 1)[-1] in NAMES]


def snapshot_running_stats(*modules: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy of its value) for every running statistic of `modules`."""
    return [(b, b.detach().clone()) for b in running_stats(*modules)]


@torch.no_grad()
def restore_running_stats(saved: list[tuple[torch.Tensor, torch.Tensor]], where: torch.Tensor | None = None) -> None:
    """Put the running statistics back to a snapshot, in place; with `where` (a bool on the
    device), only if it is true: decided on the device, so the host need not wait for it."""
    for buffer, value in saved:
        if where is None:
            buffer.copy_(value)
        else:
            torch.where(where, value, buffer, out=buffer)
