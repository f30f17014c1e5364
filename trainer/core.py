"""The trainer contract and what every family's trainer shares: phases and their one update path
(`Phase.update`), counters, precision, seeds and the learning-rate schedule.

Each family's trainer (trainer/families: GANTrainer, StyleGAN2Trainer, CycleGANTrainer,
Pix2PixTrainer, ESRGANTrainer, or a plug-in's) subclasses the abstract `TrainerBase`; the run loop
(trainer/run.py) and the reporter (trainer/reporting.py) use nothing else of it.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer import __version__
from trainer.checkpoint import CheckpointError
from trainer.config import CUDA_GRAPH_MODES, Config, check_compile, to_dict
from trainer.distributed import BufferMean, DistEnv
from trainer.precision import default_dtype, resolve_precision
from trainer.redact import redact
from trainer.running_stats import RunningStats
from trainer.strategies import strategy


class Purpose(enum.IntEnum):
    """What a draw is for: the part of its seed, `derive_seed(seed, [step,] purpose, ...)`, that
    tells the draws of one step apart. The values are part of every run's numbers: never renumber."""

    WEIGHTS = 0  # (seed, WEIGHTS): the initial weights, identical on every rank
    D_LATENTS = 1  # (seed, step, D_LATENTS, i): G's latents for the i-th D update of the step
    GP_MIX = 2  # (seed, step, GP_MIX, i): WGAN-GP's interpolation weights
    G_LATENTS = 3  # (seed, step, G_LATENTS): G's latents for its update (when not reusing the D step's)
    D_LABELS = 4  # (seed, step, D_LABELS, i): class labels of the fakes in the i-th D update
    G_LABELS = 5  # (seed, step, G_LABELS): class labels of the fakes in the G update
    SECOND_DOMAIN = 7  # (seed, SECOND_DOMAIN): the sample order of CycleGAN's second domain
    DROPOUT = 8  # (seed, step, DROPOUT, rank): dropout masks (pix2pix)
    POOL_A = 9  # (seed, step, POOL_A, rank): the image pool's coin flips, domain A (POOL_A + 1: domain B)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of `parts` (e.g. seed, step, phase)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def global_draw(seed: int, shape: tuple[int, ...], env: DistEnv, uniform: bool = False) -> torch.Tensor:
    """Draw for the whole global batch from `seed`, keep this rank's rows: independent of world size.

    Rank r takes rows r, r + W, ...: the same interleave as its data (see data_pipeline.planner),
    so the j-th real sample of the global batch meets the j-th latent (and penalty
    interpolation) whatever the number of ranks.
    """
    draw = torch.rand if uniform else torch.randn
    full = draw(shape, generator=torch.Generator().manual_seed(seed), device="cpu")  # same on every device
    mine = full[env.rank::env.world_size]
    if env.device.type == "cuda":  # from pinned memory, so the copy does not stall the host
        return mine.pin_memory().to(env.device, non_blocking=True)
    return mine.to(env.device)


class TrainingError(Exception):
    """Training cannot go on (e.g. losses stayed non-finite); the message says why."""


@dataclass
class Update:
    """What one phase update reports, every tensor on the device: its loss terms (means over the
    micro-batches), the gradient norm, and whether the step was skipped (a bool)."""

    terms: dict[str, torch.Tensor]
    grad_norm: torch.Tensor
    skipped: torch.Tensor

    def stats(self, suffix: str) -> dict[str, torch.Tensor]:
        """The terms, then `grad_norm/<suffix>` and `skipped/<suffix>` (a bool: no conversion each
        step; the reporter's stack of a log step's values makes it 0/1 in their float dtype)."""
        return self.terms | {f"grad_norm/{suffix}": self.grad_norm, f"skipped/{suffix}": self.skipped}


LossFn = Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Phase:
    """One network's update: its module (as the strategy wraps it), optimiser and own loss scaler.

    `update` is the one update path of every family; a strategy (trainer/strategies) supplies
    how gradients are made, reduced and applied: `backward`, `accumulating` and `apply`.
    """

    name: str
    module: nn.Module
    opt: torch.optim.Optimizer
    scaler: Any
    grad_clip: float = 0.0
    params: list[torch.Tensor] = field(default_factory=list, repr=False)  # the trainable ones (not frozen)
    network: nn.Module | None = field(default=None, repr=False)  # the network itself, as built (module wraps it)
    skipped: torch.Tensor | None = None  # whether the last apply() skipped its step: a bool on the device
    trainable: bool | None = field(default=None, repr=False)  # what set_trainable last set (None: not yet)

    def update(self, loss_fn: LossFn, frozen: Phase | None = None, micro_batches: int = 1) -> Update:
        """One optimiser step of this phase's network.

        `loss_fn(i)` returns (loss, terms) of micro-batch i; the losses are backpropagated (each
        divided by `micro_batches`) with the gradient reduction held back until the last one,
        then `apply` unscales, measures, clips and steps. The `frozen` phase's network takes no
        gradient meanwhile (and is trainable again after).
        """
        if frozen is not None:
            frozen.set_trainable(False)
        self.set_trainable(True)
        terms: dict[str, list[torch.Tensor]] = {}
        for i in range(micro_batches):
            with self.accumulating(last=i == micro_batches - 1):
                loss, parts = loss_fn(i)
                self.backward(loss / micro_batches if micro_batches > 1 else loss)
            for key, value in parts.items():
                terms.setdefault(key, []).append(value.detach() if value.requires_grad else value)
        norm, skipped = self.apply()
        if frozen is not None:
            frozen.set_trainable(True)
        return Update({k: v[0] if len(v) == 1 else torch.stack(v).mean() for k, v in terms.items()}, norm, skipped)

    def set_trainable(self, flag: bool) -> None:
        """requires_grad of this phase's trainable parameters (frozen ones stay fixed); only this
        method sets it, so a call that changes nothing skips the walk over the parameters."""
        if flag == self.trainable:
            return
        for p in self.params:
            p.requires_grad_(flag)
        self.trainable = flag

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of (the scaled) `loss` into this phase's network."""
        raise NotImplementedError

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's backward: hold the gradient reduction unless `last`."""
        raise NotImplementedError

    def apply(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, measure (and clip) the gradient norm, then step unless it is non-finite.
        Returns (norm, skipped), both on the device, the same on every rank."""
        raise NotImplementedError

    @torch.no_grad()
    def clamp_weights(self, bound: float) -> None:
        """Clip every weight to [-bound, bound] (WGAN's Lipschitz constraint)."""
        for p in self.network.parameters():
            p.clamp_(-bound, bound)

    def gather_state(self) -> None:
        """Every rank, before a checkpoint: collect state other ranks hold (nothing to do by default)."""

    def optimizer_state(self) -> Any:
        return self.opt.state_dict()

    def load_optimizer_state(self, state: Any) -> None:
        self.opt.load_state_dict(state)


@dataclass
class TrainState:
    step: int = 0
    nimg: int = 0
    nonfinite: int = 0  # steps skipped for a non-finite loss or gradient, in total
    nonfinite_run: int = 0  # ... in a row, up to now
    mlflow_run_id: str | None = None


def make_optimizer(kind: str, params, lr: float, betas: tuple[float, float],
                   fused: bool = False) -> torch.optim.Optimizer:
    """RMSprop, or Adam (fused: one kernel for all tensors, and it can skip a step on the device)."""
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)


class TrainerBase(abc.ABC):
    """The trainer contract: what the run loop, the reporter and the checkpoints use of a family's
    trainer, and nothing else. It also keeps precision, threads, counters and the lr schedule;
    a family's trainer (trainer/families) owns the networks, their phases and the step.

    A subclass sets `data` (its DataCursor; `datasets()` lists every cursor it reads) and the
    phases (`add_phases`), `ema` if it keeps an EMA generator, and implements `train_step` (which
    calls `begin_step` first) and `write_samples`.
    """

    phases: tuple[Phase, ...] = ()
    data: Any  # trainer.data.DataCursor: the training stream, whose position checkpoints keep

    @abc.abstractmethod
    def train_step(self) -> dict[str, torch.Tensor]:
        """One step (every phase of it); returns its statistics, each a scalar on the device."""

    @abc.abstractmethod
    def write_samples(self, samples_dir: str, step: int) -> tuple[str | None, dict[str, float]]:
        """Rank 0: the sample grid of this step (its path, or None) and held-out figures that come with it."""

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """The final generator's weights, by the name a saved generator file keeps them under:
        G_ema for a run that keeps an EMA generator (even with ema_kimg=0: then the raw one), else G."""
        return {"G_ema" if self.ema is not None else "G": self.generator().state_dict()}

    def datasets(self) -> list[Any]:
        """Every DataCursor this trainer reads (the reporter times them, preemption rewinds them)."""
        return [self.data]

    def generator(self) -> nn.Module:
        """The generator to evaluate and sample: the EMA copy when the run keeps one."""
        return self.ema.model if self.ema is not None and self.cfg.train.ema_kimg > 0 else self.G.network

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.precision = resolve_precision(cfg.precision, env.device)
        # Before any network or input exists: fp64 makes every one of them float64.
        torch.set_default_dtype(default_dtype(self.precision))
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.train.deterministic:
            # cuBLAS needs a fixed workspace to be deterministic; read when cuBLAS first starts.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.state = TrainState()
        self.ema: Any = None  # trainer.ema.EMA of G, for a family that keeps one (set after add_phases)
        self._running: RunningStats | None = None
        self._buffer_mean: BufferMean | None = None
        self.cuda_graphs = False  # the networks replay CUDA graphs (train.compile_mode, on a GPU)
        self.frozen: set[int] = set()  # ids of parameters that never train (see freeze)
        self._nonfinite: tuple[torch.Tensor, torch.Tensor] | None = None  # (skipped since last settled, in a row)

    def freeze(self, *modules: nn.Module) -> None:
        """Keep the parameters of `modules` fixed: no gradient, no optimiser, no DDP reduction.
        Call before add_phases."""
        for m in modules:
            for p in m.parameters():
                p.requires_grad_(False)
                self.frozen.add(id(p))

    def make_phase(self, name: str, module: nn.Module, lr: float) -> Phase:
        """`module` wrapped for the job, with its own optimiser and (fp16) loss scaler."""
        t = self.cfg.train
        params = [p for p in module.parameters() if id(p) not in self.frozen]
        chosen = strategy(self.cfg.strategy)
        opt = make_optimizer(t.optimizer, params, lr, (t.beta1, t.beta2), fused=chosen.FUSED_OPTIMIZER)
        return chosen.make_phase(name, module, params, opt, self.cfg, self.env, self.precision)

    def add_phases(self, g: nn.Module, d: nn.Module) -> None:
        """The G and D phases (each network compiled first when train.compile is set, in
        train.compile_mode; see compile_network)."""
        t = self.cfg.train
        check_compile(self.cfg, self.env.world_size)  # again here, for trainers built without load_config
        if t.compile:
            self.cuda_graphs = t.compile_mode in CUDA_GRAPH_MODES and self.env.device.type == "cuda"
            compile_network(g, t.compile_mode)
            compile_network(d, t.compile_mode)
        self.G = self.make_phase("G", g, self.cfg.train.lr_g)
        self.D = self.make_phase("D", d, self.cfg.train.lr_d)
        self.phases = (self.G, self.D)

    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.env.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def lr_factor(self, step: int) -> float:
        """Constant, then linear decay to 0 from lr_decay_start * max_steps (a function of the step,
        so nothing about it needs saving)."""
        t = self.cfg.train
        start = t.lr_decay_start * t.max_steps
        if step < start or t.lr_decay_start >= 1.0:
            return 1.0
        return max(0.0, (t.max_steps - step) / max(1.0, t.max_steps - start))

    def begin_step(self, base: dict[str, float]) -> None:
        """The start of every step (a family's `train_step` calls it first): each phase's lr, its
        base lr (by phase name) times the schedule's factor at this step; and, in a CUDA-graph
        compile mode on a GPU, the start of a new graph iteration (torch's
        `cudagraph_mark_step_begin`: the last step's graph outputs may then be overwritten, so
        that this step's calls can replay one recorded path)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        factor = self.lr_factor(self.state.step)
        for phase in self.phases:
            for group in phase.opt.param_groups:
                group["lr"] = base[phase.name] * factor

    def snapshot_running_stats(self, *modules: nn.Module) -> RunningStats:
        """A copy of the running statistics of `modules` (their buffers are found again only when the
        modules change), for `finish_step` to put back if the step is skipped."""
        if self._running is None or self._running.modules != modules:
            self._running = RunningStats(*modules)
        return self._running.snapshot()

    def average_buffers(self, *modules: nn.Module) -> None:
        """Make the floating-point buffers of `modules` the mean over ranks, in one all-reduce per dtype
        (the buffers are found again only when the modules change); nothing to do in one process."""
        if self._buffer_mean is None or self._buffer_mean.modules != modules:
            self._buffer_mean = BufferMean(self.env, *modules)
        self._buffer_mean()

    @torch.no_grad()
    def finish_step(self, skipped: list[torch.Tensor], running: RunningStats | None = None) -> None:
        """After every phase of a step, on the device: if any phase `skipped` its update, put the running
        statistics back to `running` (the bad batch must not stay in BN statistics, then averaged,
        EMA-copied, saved), and count the step as skipped."""
        skipped = functools.reduce(torch.logical_or, skipped)
        if running is not None:
            running.restore(where=skipped)
        if self._nonfinite is None:  # two counters, not one tensor of two: no indexing call each step
            zero = torch.zeros((), dtype=torch.int64, device=self.env.device)
            self._nonfinite = (zero, zero.clone())
        total, run = self._nonfinite
        total.add_(skipped)  # a bool adds as 0/1
        run.add_(1).mul_(skipped)

    def settle_nonfinite(self) -> None:
        """Bring the skipped-step counts to the host (one sync; the reporter calls it at log steps, and
        `state_dict` at checkpoints) and stop the run if too many steps in a row were skipped."""
        if self._nonfinite is None:
            return
        counts = self._nonfinite
        total, run = torch.stack(counts).tolist()  # one sync for both
        counts[0].zero_()
        s = self.state
        s.nonfinite += total
        s.nonfinite_run = run
        if s.nonfinite_run >= self.cfg.train.max_nonfinite:
            raise TrainingError(f"{s.nonfinite_run} steps in a row had a non-finite loss or gradient "
                                f"(up to step {s.step}); lower train.lr_g/lr_d, try precision=fp32 or "
                                f"train.grad_clip, or resume from an earlier checkpoint")

    def gather_state(self) -> None:
        """Every rank calls this before rank 0 takes `state_dict` for a checkpoint: the place to
        collect per-rank state (collectives are allowed here, not in `state_dict`)."""
        for p in self.phases:
            p.gather_state()

    def state_dict(self) -> dict[str, Any]:
        """Counters, config, data position, and per phase its network(s), optimiser and scaler."""
        self.settle_nonfinite()
        out = {"version": __version__, "step": self.state.step, "nimg": self.state.nimg,
               "nonfinite": self.state.nonfinite, "world_size": self.env.world_size, "strategy": self.cfg.strategy,
               "config": to_dict(redact(self.cfg)), "data": self.data.state_dict(),
               "mlflow_run_id": self.state.mlflow_run_id}
        for p in self.phases:
            out |= {p.name: p.network.state_dict(), f"opt_{p.name}": p.optimizer_state(),
                    f"scaler_{p.name}": p.scaler.state_dict()}
        if self.ema is not None:
            out["G_ema"] = self.ema.model.state_dict()
        return out

    def init_weights(self, state: dict[str, Any], path: str) -> None:
        """Network weights only, from another run's checkpoint (checkpoint.init_from): the
        optimisers, counters, data position and augmentation start fresh, as in fine-tuning.

        Every rank loads the same file, so the replicas stay equal without a broadcast."""
        for p in self.phases:
            load_weights(p.network, state.get(p.name), f"{path}: {p.name}")
        if self.ema is not None:
            load_weights(self.ema.model, state.get("G_ema", state.get("G")), f"{path}: G_ema")

    def load_state_dict(self, state: dict[str, Any], path: str) -> None:
        if "imported_from" in state or f"opt_{self.phases[0].name}" not in state:
            raise CheckpointError(f"{path}: holds network weights only (an imported run), not a training state to "
                                  f"resume; train into another run.dir with checkpoint.init_from={path}")
        check_compatible(state.get("config", {}), to_dict(self.cfg), path)
        for p in self.phases:
            p.network.load_state_dict(state[p.name])
            p.load_optimizer_state(state[f"opt_{p.name}"])
            p.scaler.load_state_dict(state[f"scaler_{p.name}"])
        self.data.load_state_dict(state["data"])
        self.state.step, self.state.nimg = int(state["step"]), int(state["nimg"])
        self.state.nonfinite = int(state.get("nonfinite", 0))
        self.state.mlflow_run_id = state.get("mlflow_run_id")
        if self.ema is not None:
            self.ema.model.load_state_dict(state["G_ema"])


def compile_network(module: nn.Module, mode: str) -> None:
    """torch.compile `module` in place (its state-dict keys stay) in a train.compile_mode: the CUDA-graph
    modes (CUDA_GRAPH_MODES) are meant to replay its forward and backward as CUDA graphs on a GPU
    (`make gpu-check` checks that none was skipped and that graphs were launched); on the CPU every
    mode compiles without them."""
    module.compile(mode=None if mode == "default" else mode)


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor] | None, where: str) -> None:
    """`module.load_state_dict(weights)` (in place) once the names and shapes match; else a
    CheckpointError naming the first differing keys."""
    if weights is None:
        raise CheckpointError(f"{where}: no such weights in the checkpoint")
    mine = module.state_dict()
    missing, extra = sorted(set(mine) - set(weights)), sorted(set(weights) - set(mine))
    shapes = [f"{k} {tuple(weights[k].shape)} there, {tuple(mine[k].shape)} here" for k in sorted(set(mine) & set(weights))
              if weights[k].shape != mine[k].shape]
    problems = ([f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")] if missing else []) + \
        ([f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "")] if extra else []) + shapes[:3]
    if problems:
        raise CheckpointError(f"{where}: a different architecture ({'; '.join(problems)})")
    module.load_state_dict(weights)


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """A checkpoint must come from the same architecture and objective; name what differs."""
    diffs = []
    defaults = to_dict(Config())
    for section in ("model",):
        # a key the checkpoint's version did not have yet (e.g. model.pack) had its default then
        a, b = defaults[section] | saved.get(section, {}), current.get(section, {})
        diffs += [f"{section}.{k} ({a.get(k)!r} in checkpoint, {b.get(k)!r} now)"
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    strategies = saved.get("strategy", "ddp"), current.get("strategy", "ddp")
    if strategies[0] != strategies[1]:  # their optimiser states have different layouts
        diffs.append(f"strategy ({strategies[0]!r} in checkpoint, {strategies[1]!r} now)")
    if saved.get("loss", {}).get("type") != current.get("loss", {}).get("type"):
        diffs.append(f"loss.type ({saved.get('loss', {}).get('type')!r} in checkpoint, "
                     f"{current['loss']['type']!r} now)")
    if diffs:
        raise CheckpointError(f"{path}: incompatible with this config: {', '.join(diffs)}")
