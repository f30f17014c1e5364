"""The process group and the small helpers the loop needs from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.running_stats import flat_room


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(local_rank: int) -> torch.device:
    force_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if torch.cuda.is_available() and not force_cpu:
        return torch.device("cuda", local_rank % torch.cuda.device_count())  # ranks may share a GPU
    return torch.device("cpu")


def init_distributed() -> DistEnv:
    """Join the process group set up by torchrun / accelerate launch (env://), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        # GANFORGE_BACKEND=gloo lets several ranks share one GPU (NCCL refuses that).
        backend = os.environ.get("GANFORGE_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend)
        if dist.get_world_size() != world:
            raise RuntimeError(f"process group has {dist.get_world_size()} ranks, WORLD_SIZE says {world}")
    return DistEnv(rank, world, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, env: DistEnv) -> nn.Module:
    """DDP for a multi-process run, else the module.

    Buffers (BN statistics) are not broadcast from rank 0 at each forward; the loop averages
    them across ranks after every step instead (`BufferMean`), so they reflect all data.
    """
    if env.world_size == 1:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)  # (every torch release)


class BufferMean:
    """Makes the floating-point buffers of some modules (BN running mean/var, StyleGAN2's w_avg) the
    mean over ranks, identical everywhere: after every step, in one all-reduce per dtype for all
    of them.

    The buffers are the same tensors every step (updated in place), so they are found once, with
    room for one flat copy per dtype and a view of it per buffer: each call is two fused copies,
    the all-reduce and a division per dtype, however many buffers there are.
    """

    def __init__(self, env: DistEnv, *modules: nn.Module):
        self.env, self.modules = env, modules
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in (b for m in modules for b in m.buffers() if b.is_floating_point()):
            by_dtype.setdefault(b.dtype, []).append(b)
        self.groups: list[tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]] = []
        if env.world_size == 1:  # nothing to average
            return
        for dtype, buffers in by_dtype.items():
            self.groups.append((buffers, *flat_room(buffers, dtype, env.device)))

    @torch.no_grad()
    def __call__(self) -> None:
        for buffers, flat, views in self.groups:
            torch._foreach_copy_(views, buffers)
            dist.all_reduce(flat)
            flat.div_(self.env.world_size)
            torch._foreach_copy_(buffers, views)


class StopVotes:
    """The run loop's votes to stop (a signal, the time budget, a failed save), agreed by every rank
    at every step boundary.

    One process: the votes themselves, at once. More: each call starts an all-reduce (MAX) of this
    boundary's votes on the host, in the background (over gloo: the job's group, or one of its own
    beside NCCL, so no call waits for the device), and returns the outcome of the previous call's,
    which has had a whole step to arrive: every rank sees a vote one boundary after it is cast, at
    the same step, and no step waits for a collective of its own. The first call returns no votes.
    """

    def __init__(self, env: DistEnv):
        self.env = env
        self.pending: tuple[torch.Tensor, Any] | None = None
        self.group = vote_group() if env.world_size > 1 else None

    def __call__(self, votes: list[bool]) -> list[bool]:
        if self.env.world_size == 1:
            return [bool(v) for v in votes]
        outcome = self.settle() or [False] * len(votes)
        cast = torch.tensor([1.0 if v else 0.0 for v in votes])
        self.pending = (cast, dist.all_reduce(cast, op=dist.ReduceOp.MAX, group=self.group, async_op=True))
        return outcome

    def settle(self) -> list[bool] | None:
        """Wait for the votes in flight and return their outcome (None: none in flight); the loop
        calls it when it ends, so that no collective is left pending."""
        if self.pending is None:
            return None
        cast, work = self.pending
        self.pending = None
        work.wait()
        return [bool(x > 0) for x in cast.tolist()]


_vote_groups: dict[Any, Any] = {}  # the default group -> the gloo group votes use beside it


def vote_group() -> Any:
    """The group votes are all-reduced in, on the host: None (the default group) when that is gloo,
    else a gloo group of its own, made once per default group (making one is a collective of every
    rank, so the run lock's vote and the loop's share it)."""
    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if world not in _vote_groups:
        _vote_groups.clear()  # a group of an earlier, destroyed default group is of no use
        _vote_groups[world] = dist.new_group(backend="gloo")
    return _vote_groups[world]


def stop_votes(votes: list[bool], env: DistEnv) -> list[bool]:
    """Each vote true on every rank when it is true on any rank, waited for: StopVotes' agreement
    for a single boundary."""
    once = StopVotes(env)
    outcome = once(votes)
    return outcome if env.world_size == 1 else once.settle()


def mean_across(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / env.world_size
