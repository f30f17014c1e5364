"""strategy=deepspeed: each network trained by its own DeepSpeed engine with ZeRO stage 1 or 2.

ZeRO-1 splits the optimiser state (Adam's fp32 master weights, exp_avg, exp_avg_sq) over the
ranks, ZeRO-2 also the reduced gradients; the weights themselves stay whole on every rank, so
EMA, sampling, weight clipping and BN-statistics averaging work on them as under DDP. The loop
sees a `DeepSpeedPhase`: a `trainer.core.Phase` like any other strategy's.

The DeepSpeed config is generated from the ganforge config (`deepspeed_config`) and saved as
run.dir/deepspeed_<phase>.json. Checkpoints stay ganforge's own: `gather_state` sends every
rank's optimiser partition to rank 0, which saves the list, and loading hands the whole list
to DeepSpeed, which re-partitions it (so the world size may change on resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.checkpoint import CheckpointError, to_cpu
from trainer.config import Config
from trainer.core import Phase, TrainingError
from trainer.distributed import DistEnv

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def deepspeed_config(cfg: Config, precision: str, world_size: int, numel: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for a network of `numel` parameters, every setting that changes
    training made explicit."""
    t, ds = cfg.train, cfg.deepspeed
    per_rank = t.batch_size // world_size
    # ZeRO allocates a whole reduce bucket at each backward: no bigger than the network (and
    # rounded up to a multiple of 64, which satisfies DeepSpeed's alignment).
    bucket = -(-min(ds.bucket_size, numel or ds.bucket_size) // 64) * 64
    zero: dict[str, Any] = {
        "stage": ds.zero_stage,
        # Unpadded per-rank partitions: a checkpoint can be re-partitioned for another world size.
        "elastic_checkpoint": True,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "overlap_comm": ds.overlap_comm and ds.zero_stage == 2,
        "contiguous_gradients": True,
    }
    conf: dict[str, Any] = {
        "train_batch_size": per_rank * world_size,
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        # train.accumulate micro-batches are summed locally and reduced once, at step().
        "managed_gradient_accumulation": t.accumulate == 1,
        # DeepSpeed clips at 1.0 unless told otherwise; ganforge's default is no clipping.
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # ganforge's own torch Adam / RMSprop
        "communication_data_type": "fp32",  # gradients are reduced in fp32, as under DDP
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):
        # ganforge's bf16/fp16 is autocast over fp32 weights; the engine's forward runs under the
        # same autocast, and no parameter's gradient is reduced in 16 bits.
        conf["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16",
                                  "lower_precision_safe_modules": []}
    return conf


class LossScale:
    """fp16's dynamic loss scale with GradScaler's rule and state_dict: halved after a step with a
    non-finite gradient (which is skipped), doubled after `growth_interval` finite steps in a row.

    ganforge keeps it rather than DeepSpeed: DeepSpeed's autocast scaler under ZeRO clips and reports
    the still-scaled gradient norm and never lowers its scale after an overflow.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale, self.growth_tracker = init_scale, 0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval

    def is_enabled(self) -> bool:
        return True

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale, self.growth_tracker = self.scale * self.backoff_factor, 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale, self.growth_tracker = self.scale * self.growth_factor, 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self.growth_tracker}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.growth_tracker = float(state["scale"]), int(state["_growth_tracker"])


def prepare_environment(env: DistEnv) -> None:
    """Process-wide settings DeepSpeed reads when it is first imported or initialised."""
    if env.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else it looks for (and may pick) a GPU
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    cache = os.path.join(PROJECT, ".cache", "torch_extensions")
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(PROJECT, os.W_OK):
        # DeepSpeed builds a small C++ op on first use (~1 min); keep it between runs.
        os.environ["TORCH_EXTENSIONS_DIR"] = cache
    if not dist.is_initialized():
        # DeepSpeed needs a process group even for one process.
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise TrainingError(f"strategy=deepspeed needs the deepspeed package ({e}); "
                           "run make install or pip install -c constraints.txt deepspeed") from None
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    return deepspeed


def portable(state: dict[str, Any]) -> dict[str, Any]:
    """A ZeRO optimiser state_dict as tensors and plain data only (readable with weights_only=True).

    The loss-scaler object and the parameter-slice map are rebuilt by DeepSpeed itself; the
    optimiser step goes where the elastic loader expects it (torch optimisers keep it per state).
    """
    out = {k: v for k, v in state.items() if k not in ("loss_scaler", "param_slice_mappings")}
    out["zero_stage"] = int(out["zero_stage"])
    if "base_optimizer_state_step" not in out:
        steps = [s.get("step") for s in out["base_optimizer_state"]]
        out["base_optimizer_state_step"] = int(steps[0]) if steps and steps[0] is not None else None
    return to_cpu(out)


@dataclass
class DeepSpeedPhase(Phase):
    """A Phase whose module is a DeepSpeed engine: it reduces, clips and steps; the loop only asks."""

    gathered: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def engine(self):
        return self.module

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # micro-batches accumulate locally until step()

    def backward(self, loss: torch.Tensor) -> None:
        if isinstance(self.scaler, LossScale):
            self.engine.optimizer.override_loss_scale(self.scaler.scale)  # DeepSpeed scales and unscales
        self.engine.backward(loss, scale_wrt_gas=False)

    def apply(self) -> tuple[torch.Tensor, torch.Tensor]:
        """engine.step(): the (unscaled) gradient norm over all ranks, clipping, and the step unless
        the norm is non-finite (DeepSpeed then skips it and reports an infinite norm). DeepSpeed
        decides on the host, so (norm, skipped) are copied to the device for the statistics."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)  # a Python float (DeepSpeed synced already)
        finite = math.isfinite(norm)
        if isinstance(self.scaler, LossScale):
            self.scaler.update(finite)
        norm_and_skipped = torch.tensor([norm, not finite], device=self.engine.device)
        self.skipped = norm_and_skipped[1].bool()
        return norm_and_skipped[0], self.skipped

    def clamp_weights(self, bound: float) -> None:
        super().clamp_weights(bound)
        # The optimiser's fp32 master partition is what the next step starts from.
        self.engine.optimizer.refresh_fp32_params()

    def gather_state(self) -> None:
        """Every rank: send its optimiser partition to rank 0, which saves the list."""
        mine = portable(self.engine.optimizer.state_dict())
        if dist.get_world_size() == 1:
            self.gathered = [mine]
            return
        main = dist.get_rank() == 0
        parts: list[Any] | None = [None] * dist.get_world_size() if main else None
        dist.gather_object(mine, parts, dst=0)
        self.gathered = parts

    def optimizer_state(self) -> list[dict[str, Any]]:
        if self.gathered is None:
            raise RuntimeError("gather_state() must run on every rank before a DeepSpeed checkpoint")
        parts, self.gathered = self.gathered, None
        return parts

    def load_optimizer_state(self, state: Any) -> None:
        if not isinstance(state, list):
            raise CheckpointError(f"optimizer state of {self.name} is not a DeepSpeed (per-rank) state")
        self.engine.optimizer.load_state_dict(state, load_from_fp32_weights=True)
        settle_loaded_state(self.engine.optimizer.optimizer)


def settle_loaded_state(opt: torch.optim.Optimizer) -> None:
    """Put back what DeepSpeed's elastic loader changes in a torch optimiser: it adds a 'step'
    to each param group and restores the per-state 'step' as a 1-element tensor on the device."""
    for group in opt.param_groups:
        group.pop("step", None)
        on_device = group.get("capturable") or group.get("fused")
        for p in group["params"]:
            state = opt.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                step = state["step"].reshape(())
                state["step"] = step if on_device else step.cpu()


FUSED_OPTIMIZER = False  # DeepSpeed steps its own flat partitions


def make_phase(name: str, module: nn.Module, params: list[torch.Tensor], opt: torch.optim.Optimizer,
               cfg: Config, env: DistEnv, precision: str) -> DeepSpeedPhase:
    """`module` and `opt` handed to deepspeed.initialize; its config saved as run.dir/deepspeed_<name>.json."""
    prepare_environment(env)
    deepspeed = import_deepspeed()
    conf = deepspeed_config(cfg, precision, env.world_size, sum(p.numel() for p in module.parameters()))
    if env.is_main:
        os.makedirs(cfg.run.dir, exist_ok=True)
        with open(os.path.join(cfg.run.dir, f"deepspeed_{name}.json"), "w") as f:
            json.dump(conf, f, indent=2)
            f.write("\n")
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=conf, dist_init_required=False)
    if precision == "fp16":
        optimizer.torch_autocast_gradscaler = None  # the loss scale is LossScale's, set at each backward
        scaler = LossScale()
    else:
        scaler = torch.amp.GradScaler(env.device.type, enabled=False)
    return DeepSpeedPhase(name, engine, optimizer, scaler, cfg.train.grad_clip, params, network=module)
