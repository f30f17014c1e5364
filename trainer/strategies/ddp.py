"""strategy=ddp: the network under torch DistributedDataParallel (alone in a one-process job)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.config import Config
from trainer.core import Phase
from trainer.distributed import DistEnv, wrap

FUSED_OPTIMIZER = True  # Adam's fused kernel: one launch for every tensor, and it can skip a step on the device


@dataclass
class DDPPhase(Phase):
    """Gradients all-reduced by DDP at the last micro-batch's backward; fp16 through torch's GradScaler."""

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def accumulating(self, last: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch."""
        if last or not isinstance(self.module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def apply(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, measure (and clip) the gradient norm, then step unless it is non-finite.

        Gradients are already averaged over ranks here, so every rank takes the same decision; a
        fused optimiser takes it on the device, so the host does not wait for the GPU (see
        `step_unless`).
        """
        self.scaler.unscale_(self.opt)
        params = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in params]
        norm = total_norm(grads) if grads else torch.zeros((), device=self.scaler._device)
        skipped = torch.isfinite(norm).logical_not_()
        if self.grad_clip > 0:  # a non-finite norm turns the gradients to 0 or NaN; the step is skipped anyway
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)  # takes the parameters
        if self.scaler.is_enabled():  # the fp16 scaler skips the step and lowers its scale itself
            self.scaler.step(self.opt)
        else:
            step_unless(self.opt, skipped)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.skipped = skipped
        return norm, skipped


@torch.no_grad()
def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `grads` taken as one vector (as torch.nn.utils.get_total_norm, with the same
    kernels and result): one fused kernel for the per-tensor norms, without per-tensor host calls."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def step_unless(opt: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """`opt.step()` unless `skip` (a bool on the device).

    An optimiser with a fused kernel (Adam with fused=True) reads the decision on the device, as
    it reads the fp16 scaler's `found_inf`: nothing moves and its step counts stay. Any other
    optimiser (RMSprop) needs the decision on the host: one device sync.
    """
    if getattr(opt, "_step_supports_amp_scaling", False):
        opt.grad_scale, opt.found_inf = None, skip.to(torch.float32)
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
    elif not bool(skip):
        opt.step()


def make_phase(name: str, module: nn.Module, params: list[torch.Tensor], opt: torch.optim.Optimizer,
               cfg: Config, env: DistEnv, precision: str) -> DDPPhase:
    """`module` wrapped in DDP (more than one rank), with a GradScaler that is active for fp16 only."""
    scaler = torch.amp.GradScaler(env.device.type, enabled=precision == "fp16")
    return DDPPhase(name, wrap(module, env), opt, scaler, cfg.train.grad_clip, params, network=module)
