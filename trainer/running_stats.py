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


Snapshot = list[tuple[list[torch.Tensor], torch.Tensor]]


def snapshot_running_stats(buffers: list[torch.Tensor]) -> Snapshot:
    """Per dtype, (the buffers, one flat copy of their values): a copy in a few kernel launches
    however many buffers there are (this runs every step)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in buffers:
        groups.setdefault(b.dtype, []).append(b)
    return [(group, flat(group)) for group in groups.values()]


def flat(buffers: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([b.detach().reshape(-1) for b in buffers])


@torch.no_grad()
def restore_running_stats(saved: Snapshot, where: torch.Tensor | None = None) -> None:
    """Put the running statistics back to a snapshot, in place; with `where` (a bool on the
    device), only if it is true: decided on the device, so the host need not wait for it."""
    for buffers, values in saved:
        if where is not None:
            values = torch.where(where, values, flat(buffers))
        parts = values.split([b.numel() for b in buffers])
        torch._foreach_copy_(buffers, [v.view_as(b) for v, b in zip(parts, buffers, strict=True)])
