"""Normalisation running statistics (BatchNorm's running mean/var and count): kept apart from a skipped step.

A step skipped for a non-finite loss or gradient leaves the weights alone, but its forward
passes have already folded the bad batch into the running statistics, which are then averaged
over ranks, copied into the EMA and checkpointed. The trainer snapshots these few small
buffers before a step and puts them back when the step is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NAMES = ("running_mean", "running_var", "num_batches_tracked")


def running_stats(*modules: nn.Module) -> list[torch.Tensor]:
    """The running-statistics buffers of `modules` (BatchNorm, SyncBatchNorm, tracked InstanceNorm)."""
    return [b for m in modules for name, b in m.named_buffers() if name.rsplit(".", 1)[-1] in NAMES]


def as_bytes(buffer: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous `buffer`, as a 1-d uint8 view of its storage (writes go through)."""
    if not buffer.is_contiguous():
        raise ValueError(f"a running-statistics buffer of shape {tuple(buffer.shape)} is not contiguous")
    return buffer.view(-1).view(torch.uint8)


@dataclass
class _Group:
    """The buffers on one device, as byte views (so float statistics and int64 counts go together),
    and two flat byte tensors of their total size with a view per buffer: `saved` holds the
    snapshot, `current` is scratch for the restore."""

    buffers: list[torch.Tensor]
    saved: torch.Tensor
    saved_views: list[torch.Tensor]
    current: torch.Tensor
    current_views: list[torch.Tensor]


def flat_room(like: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One flat tensor with room for every tensor of `like`, and a view of it shaped like each."""
    flat = torch.empty(sum(t.numel() for t in like), dtype=dtype, device=device)
    return flat, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


class RunningStats:
    """The running statistics of some modules (the same tensors every step, so found once), with
    room for one snapshot. Taking a snapshot is one fused copy per device and putting it back three
    calls, however many buffers of whatever dtypes there are: this runs every step. The snapshot
    is of the buffers' bytes, so what is put back is bitwise what was taken, NaN or not."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for b in running_stats(*modules):
            by_device.setdefault(b.device, []).append(as_bytes(b))
        self.groups = []
        for device, buffers in by_device.items():
            saved, current = (flat_room(buffers, torch.uint8, device) for _ in range(2))
            self.groups.append(_Group(buffers, *saved, *current))

    @torch.no_grad()
    def snapshot(self) -> RunningStats:
        """Copy the buffers' values into the snapshot (replacing the last one); returns self."""
        for g in self.groups:
            torch._foreach_copy_(g.saved_views, g.buffers)
        return self

    @torch.no_grad()
    def restore(self, where: torch.Tensor) -> None:
        """Put the buffers back to the snapshot, in place, if `where` (a bool on the device) is true:
        decided on the device, so the host need not wait for it."""
        for g in self.groups:
            torch._foreach_copy_(g.current_views, g.buffers)
            torch.where(where, g.saved, g.current, out=g.current)
            torch._foreach_copy_(g.buffers, g.current_views)
