"""The D/G training loop: phases, checkpoints, samples and telemetry around one readable step."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer import __version__
from trainer.checkpoint import CheckpointError, CheckpointManager, load_latest, read_checkpoint
from trainer.config import Config, dump_yaml, to_dict, to_flat
from trainer.data import DataCursor, to_unit_range
from trainer.distributed import (
    DistEnv,
    average_buffers,
    init_distributed,
    mean_across,
    shutdown,
    stop_votes,
    unwrap,
    wrap,
)
from trainer.ema import EMA
from trainer.models import build_models
from trainer.objectives import d_loss, g_loss, gradient_penalty
from trainer.preemption import Preempted, StopFlag
from trainer.sampling import generate, latents, save_grid
from trainer.telemetry.mlflow import MlflowTracker, resolve_tracking_uri
from trainer.telemetry.prometheus import PrometheusExporter, restart_count


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a pure function of `parts` (e.g. seed, step, phase)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def global_draw(seed: int, shape: tuple[int, ...], env: DistEnv, uniform: bool = False) -> torch.Tensor:
    """Draw for the whole global batch from `seed`, keep this rank's slice: independent of world size."""
    draw = torch.rand if uniform else torch.randn
    full = draw(shape, generator=torch.Generator().manual_seed(seed))
    per_rank = shape[0] // env.world_size
    return full[env.rank * per_rank:(env.rank + 1) * per_rank].to(env.device)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@dataclass
class Phase:
    """One network's update: its (possibly DDP-wrapped) module, optimiser and loss scaler."""

    name: str
    module: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()


@dataclass
class TrainState:
    step: int = 0
    nimg: int = 0
    mlflow_run_id: str | None = None
    history: dict[str, list[float]] = field(default_factory=dict)


class Trainer:
    """Owns the networks, their phases and the data cursor for one run."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.precision = resolve_precision(cfg.precision, env.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(derive_seed(cfg.seed, 0))  # identical initial weights on every rank
        g, d = build_models(cfg.model)
        g, d = g.to(env.device), d.to(env.device)
        self.ema = EMA(g, cfg.train.ema_kimg, cfg.train.ema_rampup)
        betas = (cfg.train.beta1, cfg.train.beta2)
        fp16 = self.precision == "fp16"
        self.G = Phase("G", wrap(g, env), torch.optim.Adam(g.parameters(), cfg.train.lr_g, betas),
                       torch.amp.GradScaler(env.device.type, enabled=fp16))
        self.D = Phase("D", wrap(d, env), torch.optim.Adam(d.parameters(), cfg.train.lr_d, betas),
                       torch.amp.GradScaler(env.device.type, enabled=fp16))
        self.data = DataCursor(cfg.data.train, cfg, env)
        self.state = TrainState()
        self.fixed_z = latents(cfg.seed, cfg.log.sample_count, cfg.model.z_dim, env.device)

    # -- the step -------------------------------------------------------------------------------
    def autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.env.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def d_step(self, real: torch.Tensor, z: torch.Tensor, eps: torch.Tensor | None) -> dict[str, torch.Tensor]:
        cfg, g, d = self.cfg, unwrap(self.G.module), self.D.module
        g.requires_grad_(False)
        d.requires_grad_(True)
        with torch.no_grad(), self.autocast():
            fake = g(z)
        with self.autocast():
            real_out, fake_out = d(real), d(fake.detach())
            loss = d_loss(cfg.loss.type, real_out, fake_out)
        stats = {"loss/d": loss.detach()}
        if eps is not None:
            gp = gradient_penalty(unwrap(d), real, fake.detach().float(), eps)
            loss = loss + cfg.loss.gp_weight * gp
            stats["loss/gp"] = gp.detach()
        self.D.step(loss)
        if cfg.loss.type == "wgan":
            with torch.no_grad():
                for p in d.parameters():
                    p.clamp_(-cfg.loss.clip, cfg.loss.clip)
        stats["d/real"] = real_out.detach().float().mean()
        stats["d/fake"] = fake_out.detach().float().mean()
        return stats

    def g_step(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        g, d = self.G.module, unwrap(self.D.module)  # D unwrapped: no DDP reduction for D here
        d.requires_grad_(False)
        g.requires_grad_(True)
        with self.autocast():
            loss = g_loss(self.cfg.loss.type, d(g(z)))
        self.G.step(loss)
        d.requires_grad_(True)
        return {"loss/g": loss.detach()}

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, env, step = self.cfg, self.env, self.state.step
        gb, zd = cfg.train.batch_size, cfg.model.z_dim
        stats: dict[str, torch.Tensor] = {}
        for i in range(cfg.train.n_critic):
            real = to_unit_range(self.data.next()["image"])
            z = global_draw(derive_seed(cfg.seed, step, 1, i), (gb, zd), env)
            eps = None
            if cfg.loss.type == "wgan_gp":
                eps = global_draw(derive_seed(cfg.seed, step, 2, i), (gb,), env, uniform=True)
            stats = self.d_step(real, z, eps)
        stats |= self.g_step(global_draw(derive_seed(cfg.seed, step, 3), (gb, zd), env))
        average_buffers(self.G.module, env)
        average_buffers(self.D.module, env)
        self.state.step += 1
        self.state.nimg += gb
        self.ema.update(unwrap(self.G.module), gb, self.state.nimg)
        return stats

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "step": self.state.step,
            "nimg": self.state.nimg,
            "world_size": self.env.world_size,
            "config": to_dict(self.cfg),
            "data": self.data.state_dict(),
            "G": unwrap(self.G.module).state_dict(),
            "D": unwrap(self.D.module).state_dict(),
            "G_ema": self.ema.model.state_dict(),
            "opt_G": self.G.opt.state_dict(),
            "opt_D": self.D.opt.state_dict(),
            "scaler_G": self.G.scaler.state_dict(),
            "scaler_D": self.D.scaler.state_dict(),
            "mlflow_run_id": self.state.mlflow_run_id,
        }

    def load_state_dict(self, state: dict[str, Any], path: str) -> None:
        check_compatible(state.get("config", {}), to_dict(self.cfg), path)
        unwrap(self.G.module).load_state_dict(state["G"])
        unwrap(self.D.module).load_state_dict(state["D"])
        self.ema.model.load_state_dict(state["G_ema"])
        self.G.opt.load_state_dict(state["opt_G"])
        self.D.opt.load_state_dict(state["opt_D"])
        self.G.scaler.load_state_dict(state["scaler_G"])
        self.D.scaler.load_state_dict(state["scaler_D"])
        self.data.load_state_dict(state["data"])
        self.state.step, self.state.nimg = int(state["step"]), int(state["nimg"])
        self.state.mlflow_run_id = state.get("mlflow_run_id")


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """A checkpoint must come from the same architecture and objective; name what differs."""
    diffs = []
    for section in ("model",):
        a, b = saved.get(section, {}), current.get(section, {})
        diffs += [f"{section}.{k} ({a.get(k)!r} in checkpoint, {b.get(k)!r} now)"
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if saved.get("loss", {}).get("type") != current.get("loss", {}).get("type"):
        diffs.append(f"loss.type ({saved.get('loss', {}).get('type')!r} in checkpoint, "
                     f"{current['loss']['type']!r} now)")
    if diffs:
        raise CheckpointError(f"{path}: incompatible with this config: {', '.join(diffs)}")


def pick_checkpoint(cfg: Config, env: DistEnv) -> tuple[str, dict[str, Any]] | None:
    """Rank 0 chooses the checkpoint to resume from; every rank loads that same file."""
    choice: list[Any] = [None]
    if env.is_main:
        if cfg.checkpoint.resume == "latest":
            found = load_latest(cfg.run.dir)
            choice[0] = found[0] if found else None
        elif cfg.checkpoint.resume != "none":
            choice[0] = cfg.checkpoint.resume
    if env.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    return (choice[0], read_checkpoint(choice[0])) if choice[0] else None


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Reporter:
    """Rank 0's progress line, sample grids and MLflow; every rank's /metrics exporter."""

    def __init__(self, trainer: Trainer, resumed_step: int):
        self.t = trainer
        cfg, env = trainer.cfg, trainer.env
        self.active = env.is_main
        self.tracker: MlflowTracker | None = None
        self.t0 = time.perf_counter()
        self.last = (self.t0, trainer.state.step)
        self.iter_mark: float | None = None  # end of the previous iteration (start: first batch request)
        self.data_wait, self.wait_window, self.images_read = 0.0, 0.0, 0
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=env.device)  # summed without a sync
        self.ckpt_seen, self.checkpoints = 0.0, None
        self._time_data(trainer.data)
        build = {"version": __version__, "commit": git_commit(), "torch": torch.__version__,
                 "device": env.device.type, "precision": trainer.precision}
        self.exporter = PrometheusExporter.for_rank(cfg.log.prometheus_port, env, cfg.run.name, build)
        if self.exporter:
            self.exporter.restarted(restart_count(resumed_step >= 0))
            self.exporter.checkpoint_saved(None, time.time())  # nothing to lose yet
        if not self.active:
            return
        uri = resolve_tracking_uri(cfg.log.mlflow_uri, cfg.run.dir)
        if uri:
            tags = {"ganforge.version": __version__, "git.commit": build["commit"],
                    "world_size": str(env.world_size), "device": env.device.type,
                    "device_count": str(torch.cuda.device_count() if env.device.type == "cuda" else 1),
                    "precision": trainer.precision, "mlflow.runName": cfg.run.name}
            self.tracker = MlflowTracker(uri, cfg.log.experiment, cfg.run.name, trainer.state.mlflow_run_id,
                                         to_flat(cfg), tags, resume_step=resumed_step)
            self.uri = uri

    def _time_data(self, data: DataCursor) -> None:
        """Count the time this rank waits in `data.next()` (and the images it gets) for telemetry."""
        fetch = data.next

        def timed_next() -> dict[str, torch.Tensor]:
            t0 = time.perf_counter()
            if self.iter_mark is None:
                self.iter_mark = t0
            batch = fetch()
            self.data_wait += time.perf_counter() - t0
            self.images_read += len(next(iter(batch.values())))
            return batch

        data.next = timed_next

    def watch_checkpoints(self, manager: CheckpointManager) -> None:
        """Report the saves of `manager` (duration, time) on /metrics as they complete."""
        self.checkpoints = manager

    def _count_step(self, stats: dict[str, torch.Tensor]) -> None:
        """Every step, on every rank, without a device sync: non-finite losses and /metrics counters."""
        self.nonfinite += ~torch.isfinite(torch.stack(list(stats.values()))).all()
        now = time.perf_counter()
        self.wait_window += self.data_wait
        if self.exporter:
            seconds = now - self.iter_mark if self.iter_mark is not None else None
            self.exporter.step_done(self.t.state.step, seconds, self.images_read, self.data_wait)
            done = getattr(self.checkpoints, "last_time", 0.0)
            if done > self.ckpt_seen:  # a background save finished since the last step
                self.ckpt_seen = done
                self.exporter.checkpoint_saved(self.checkpoints.last_write_s, done)
        self.iter_mark, self.data_wait, self.images_read = now, 0.0, 0

    def log(self, stats: dict[str, torch.Tensor]) -> None:
        t = self.t
        step, cfg = t.state.step, t.cfg
        self._count_step(stats)
        if step % cfg.log.every_steps and step != cfg.train.max_steps:
            return
        values = {k: float(v) for k, v in zip(stats, mean_across(torch.stack(list(stats.values())), t.env).tolist(), strict=True)}
        values |= {f"lr/{p.name.lower()}": p.opt.param_groups[0]["lr"] for p in (t.G, t.D)}
        values["train/nonfinite_steps"] = float(self.nonfinite.item())
        if self.exporter:
            self.exporter.report(values, int(values["train/nonfinite_steps"]), t.env.device, t.data.epoch)
        if not self.active:
            return
        now = time.perf_counter()
        dt, dsteps = now - self.last[0], step - self.last[1]
        self.last = (now, step)
        ips = dsteps * cfg.train.batch_size * cfg.train.n_critic / max(dt, 1e-9)
        values |= {"perf/images_per_s": ips, "progress/kimg": t.state.nimg / 1000,
                   "data/epoch": t.data.epoch, "data/skipped": t.data.skipped}
        values["perf/data_wait_fraction"] = min(1.0, self.wait_window / max(dt, 1e-9))
        self.wait_window = 0.0
        remaining = (cfg.train.max_steps - step) * dt / max(dsteps, 1)
        shown = "  ".join(f"{k.split('/')[-1] if k.startswith('loss') else k}={v:.3f}"
                          for k, v in values.items() if k.startswith(("loss", "d/")))
        print(f"step {step}/{cfg.train.max_steps}  {shown}  {ips:.0f} img/s  "
              f"epoch {t.data.epoch}  eta {remaining / 60:.1f} min", flush=True)
        with open(os.path.join(cfg.run.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tracker:
            self.tracker.log_metrics(values, step)

    def samples(self, final: bool = False) -> str | None:
        t = self.t
        step, cfg = t.state.step, t.cfg
        if not self.active or (step % cfg.log.sample_every_steps and not final):
            return None
        images = generate(t.ema.model if cfg.train.ema_kimg > 0 else unwrap(t.G.module), t.fixed_z)
        path = save_grid(images, os.path.join(cfg.run.dir, "samples", f"step_{step:08d}.png"))
        save_grid(images, os.path.join(cfg.run.dir, "samples", "latest.png"))
        if self.tracker:
            self.tracker.log_artifact(path, "samples")
        return path

    def close(self, status: str) -> None:
        if self.tracker:
            self.tracker.log_artifact(os.path.join(self.t.cfg.run.dir, "config.yaml"))
            if status == "FINISHED":
                self.tracker.log_artifact(self.save_generator(), "model")
            self.tracker.close(status)
        if self.exporter:
            self.exporter.close()

    def save_generator(self) -> str:
        """run.dir/generator_ema.pt: the final EMA generator alone, loadable by `ganforge sample --checkpoint`."""
        t = self.t
        g = t.ema.model if t.cfg.train.ema_kimg > 0 else unwrap(t.G.module)
        path = os.path.join(t.cfg.run.dir, "generator_ema.pt")
        torch.save({"step": t.state.step, "config": to_dict(t.cfg), "G_ema": g.state_dict()}, path)
        return path


def run_training(cfg: Config) -> dict[str, Any]:
    """Train per `cfg` in this process (one rank of the job); returns a summary on rank 0."""
    env = init_distributed()
    try:
        return _run(cfg, env)
    finally:
        shutdown()


def _run(cfg: Config, env: DistEnv) -> dict[str, Any]:
    trainer = Trainer(cfg, env)
    resumed = pick_checkpoint(cfg, env)
    if resumed:
        trainer.load_state_dict(resumed[1], resumed[0])
    if env.is_main:
        os.makedirs(cfg.run.dir, exist_ok=True)
        with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(cfg))
        where = f"resuming from {resumed[0]} at step {trainer.state.step}" if resumed else "starting"
        print(f"ganforge: {where}; world size {env.world_size} on {env.device.type}, "
              f"precision {trainer.precision}, global batch {cfg.train.batch_size}", flush=True)
    reporter = Reporter(trainer, trainer.state.step if resumed else -1)
    if reporter.tracker:
        trainer.state.mlflow_run_id = reporter.tracker.wait_ready(timeout=30)

    ckpt = CheckpointManager(cfg.run.dir, cfg.checkpoint.keep, cfg.checkpoint.milestone_every)
    reporter.watch_checkpoints(ckpt)
    saved_step = trainer.state.step if resumed else -1

    def checkpoint(blocking: bool = False) -> None:
        nonlocal saved_step
        if env.is_main and saved_step != trainer.state.step:
            ckpt.save(trainer.state.step, trainer.state_dict(), blocking)
        if blocking:
            if env.is_main:
                ckpt.wait()
            if env.world_size > 1:
                dist.barrier()  # no rank exits (and gets the job torn down) before the save is on disk
        saved_step = trainer.state.step

    flag = StopFlag().install()
    start, status = time.perf_counter(), "FAILED"
    budget = cfg.train.max_minutes * 60
    try:
        while trainer.state.step < cfg.train.max_steps:
            stats = trainer.train_step()
            reporter.log(stats)
            reporter.samples()
            if trainer.state.step % cfg.checkpoint.every_steps == 0:
                checkpoint()
            preempt, over_budget = stop_votes([flag.requested, budget > 0 and time.perf_counter() - start > budget], env)
            if preempt:
                checkpoint(blocking=True)
                status = "KILLED"
                raise Preempted(trainer.state.step, flag.signum or 15)
            if over_budget:
                if env.is_main:
                    print(f"ganforge: time budget of {cfg.train.max_minutes} min reached at step "
                          f"{trainer.state.step}", flush=True)
                break
        checkpoint(blocking=True)
        grid = reporter.samples(final=True)
        status = "FINISHED"
    finally:
        flag.uninstall()
        reporter.close(status)
    last_ckpt = ckpt.last_path or (resumed[0] if resumed else None)
    summary = {"step": trainer.state.step, "checkpoint": last_ckpt, "samples": grid,
               "run_dir": cfg.run.dir, "mlflow_uri": getattr(reporter, "uri", None),
               "mlflow_run_id": trainer.state.mlflow_run_id}
    if env.is_main:
        print_summary(summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print(f"\nganforge: done at step {s['step']}", flush=True)
    if s["samples"]:
        print(f"  samples:     {s['samples']}")
    if s["checkpoint"]:
        print(f"  checkpoints: {os.path.dirname(s['checkpoint'])}")
    if s["mlflow_uri"]:
        print(f"  MLflow:      mlflow ui --backend-store-uri {s['mlflow_uri']}   (run {s['mlflow_run_id']})")
    sys.stdout.flush()
