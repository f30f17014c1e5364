"""The D/G training loop: phases, checkpoints, samples and telemetry around one readable step."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.progress import clock
from trainer import __version__
from trainer.checkpoint import CheckpointError, CheckpointManager, load_latest, read_checkpoint
from trainer.config import Config, applicable_params, dump_yaml, to_dict
from trainer.core import (  # noqa: F401  (re-exported: the loop's public names)
    Phase,
    TrainerBase,
    TrainingError,
    TrainState,
    check_compatible,
    derive_seed,
    global_draw,
    make_optimizer,
    resolve_precision,
)
from trainer.data import DataCursor, to_unit_range
from trainer.distributed import (
    DistEnv,
    average_buffers,
    init_distributed,
    mean_across,
    shutdown,
    stop_votes,
    unwrap,
)
from trainer.ema import EMA
from trainer.families import family
from trainer.models import build_models
from trainer.objectives import d_loss, g_loss, gradient_penalty, r1_penalty
from trainer.packing import pack
from trainer.precision import upcast
from trainer.preemption import Preempted, StopFlag
from trainer.redact import redact
from trainer.sampling import ServedGenerator, class_cycle, generate, latents, save_samples
from trainer.sync_batchnorm import convert_sync_batchnorm
from trainer.telemetry.mlflow import MlflowTracker, resolve_tracking_uri
from trainer.telemetry.prometheus import PrometheusExporter, restart_count

log = logging.getLogger(__name__)

# The training line's names for the statistics every family reports; other losses show as loss_<name>.
SHOWN = {"loss/d": "loss_d", "d/real": "D(real)", "d/fake": "D(fake)", "loss/g": "loss_g"}


def shown_name(key: str) -> str | None:
    """How a statistic is named on the training line (None: not shown there)."""
    return SHOWN.get(key) or (f"loss_{key[5:]}" if key.startswith("loss/") else None)

class Trainer(TrainerBase):
    """Owns the networks, their phases and the data cursor for one run."""

    def __init__(self, cfg: Config, env: DistEnv):
        super().__init__(cfg, env)
        gpu = env.device.type == "cuda"
        torch.manual_seed(derive_seed(cfg.seed, 0))  # identical initial weights on every rank
        g, d = build_models(cfg.model)
        if cfg.model.sync_bn and env.world_size > 1:
            g, d = (convert_sync_batchnorm(m, env.device) for m in (g, d))
        # Not under compile (inductor picks conv layouts itself, and torch 2.11's inductor fails on
        # channels_last weights in convolution_backward) nor DeepSpeed (it flattens contiguous params).
        channels_last = gpu and cfg.train.channels_last and cfg.model.arch == "dcgan" and not cfg.train.compile \
            and cfg.strategy == "ddp"
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format
        g, d = (m.to(env.device, memory_format=self.memory_format) for m in (g, d))
        self.ema = EMA(g, cfg.train.ema_kimg, cfg.train.ema_rampup)
        self.add_phases(g, d)
        self.data = DataCursor(cfg.data.train, cfg, env)
        self.points = self.data.stream.index.kind == "points"
        self.kept_fake: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.fixed_z = latents(cfg.seed, cfg.log.sample_count, cfg.model.z_dim, env.device)
        self.fixed_labels = (torch.arange(cfg.log.sample_count, device=env.device) % cfg.model.num_classes
                             if cfg.model.num_classes else None)

    # -- the step -------------------------------------------------------------------------------
    def real_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next real batch on the device, in the model's range, with its labels if conditional."""
        batch = self.data.next()
        x = batch["points"].to(torch.get_default_dtype()) if self.points else to_unit_range(batch["image"]).contiguous(memory_format=self.memory_format)
        return x, batch.get("label") if self.cfg.model.num_classes else None

    def d_step(self, real: torch.Tensor, z: torch.Tensor, eps: torch.Tensor | None = None,
               real_labels: torch.Tensor | None = None, fake_labels: torch.Tensor | None = None,
               r1: bool = False, keep_fake: bool = False) -> dict[str, torch.Tensor]:
        """One D update over `accumulate` micro-batches: real vs G(z), plus GP / lazy R1 terms;
        D sees each micro-batch in packs of model.pack samples (PacGAN), penalties included.

        With keep_fake (one micro-batch), G(z) is computed with its graph and kept for the G
        step that follows, which then needs no second G forward (as in pytorch/examples dcgan).
        """
        cfg, g, d = self.cfg, unwrap(self.G.module), self.D.module
        self.trainable(g, keep_fake)
        self.trainable(d, True)
        k = cfg.train.accumulate
        if keep_fake and k != 1:
            raise ValueError("keep_fake needs train.accumulate=1")
        terms: dict[str, list[torch.Tensor]] = {}
        for i in range(k):
            part = slice(i * len(z) // k, (i + 1) * len(z) // k)
            x, yr = real[part], real_labels[part] if real_labels is not None else None
            yf = fake_labels[part] if fake_labels is not None else None
            if keep_fake:
                with self.autocast():
                    fake = self.G.module(z, yf)
                self.kept_fake = (fake, yf)
            else:
                with torch.no_grad(), self.autocast():
                    fake = g(z[part], yf)
            x, yr, fake, yf = (pack(v, cfg.model.pack) for v in (x, yr, fake, yf))
            if r1:
                x = x.detach().requires_grad_(True)
            with self.D.accumulating(last=i == k - 1):
                with self.autocast():
                    real_out, fake_out = d(x, yr), d(fake.detach(), yf)
                    loss = d_loss(cfg.loss.type, real_out, fake_out)
                parts = {"loss/d": loss.detach(), "d/real": upcast(real_out.detach()).mean(),
                         "d/fake": upcast(fake_out.detach()).mean()}
                if eps is not None:
                    # a pack's interpolation takes the draw of its first sample
                    gp = gradient_penalty(unwrap(d), x, upcast(fake.detach()), eps[part][:len(x)], yr)
                    loss = loss + cfg.loss.gp_weight * gp
                    parts["loss/gp"] = gp.detach()
                if r1:
                    penalty = r1_penalty(real_out, x)
                    # Lazy regularisation: applied every r1_every steps, so scaled by r1_every.
                    loss = loss + cfg.loss.r1_gamma / 2 * penalty * cfg.loss.r1_every
                    parts["loss/r1"] = penalty.detach()
                self.D.backward(loss / k if k > 1 else loss)
            for key, v in parts.items():
                terms.setdefault(key, []).append(v)
        norm, skipped = self.D.apply()
        if cfg.loss.type == "wgan":  # a skipped step left the weights as they were: clamped already
            self.D.clamp_weights(cfg.loss.clip)
        stats = {key: torch.stack(v).mean() for key, v in terms.items()}
        return stats | {"grad_norm/d": norm, "skipped/d": self.flag(skipped)}

    def g_step(self, z: torch.Tensor | None, labels: torch.Tensor | None = None,
               fake: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One G update on G(z), or on a `fake` kept from the D step: D frozen and unwrapped,
        so DDP reduces only G's gradients."""
        g, d = self.G.module, unwrap(self.D.module)
        self.trainable(d, False)
        self.trainable(g, True)
        k, n = self.cfg.train.accumulate, self.cfg.model.pack
        losses = []
        if fake is not None:
            with self.autocast():
                loss = g_loss(self.cfg.loss.type, d(pack(fake, n), pack(labels, n)))
            self.G.backward(loss)
            losses.append(loss.detach())
        for i in range(k if fake is None else 0):
            part = slice(i * len(z) // k, (i + 1) * len(z) // k)
            y = labels[part] if labels is not None else None
            with self.G.accumulating(last=i == k - 1), self.autocast():
                loss = g_loss(self.cfg.loss.type, d(pack(g(z[part], y), n), pack(y, n)))
                self.G.backward(loss / k if k > 1 else loss)
            losses.append(loss.detach())
        norm, skipped = self.G.apply()
        self.trainable(d, True)
        return {"loss/g": torch.stack(losses).mean(), "grad_norm/g": norm,
                "skipped/g": self.flag(skipped)}

    def fake_labels(self, seed: int) -> torch.Tensor | None:
        n = self.cfg.model.num_classes
        if not n:
            return None
        full = torch.randint(n, (self.cfg.train.batch_size,), generator=torch.Generator().manual_seed(seed),
                             device="cpu")
        return full[self.env.rank::self.env.world_size].to(self.env.device)

    def train_step(self) -> dict[str, torch.Tensor]:
        cfg, env, step = self.cfg, self.env, self.state.step
        self.set_learning_rates(step, {"G": cfg.train.lr_g, "D": cfg.train.lr_d})
        gb, zd = cfg.train.batch_size, cfg.model.z_dim
        stats: dict[str, torch.Tensor] = {}
        skipped = []
        norm_stats = self.snapshot_running_stats(self.G.module, self.D.module)  # put back if the step is skipped
        reuse = cfg.train.accumulate == 1  # the last D step's G(z) feeds the G step
        for i in range(cfg.train.n_critic):
            real, real_labels = self.real_batch()
            z = global_draw(derive_seed(cfg.seed, step, 1, i), (gb, zd), env)
            eps = None
            if cfg.loss.type == "wgan_gp":
                eps = global_draw(derive_seed(cfg.seed, step, 2, i), (gb,), env, uniform=True)
            r1 = cfg.loss.r1_gamma > 0 and (step * cfg.train.n_critic + i) % cfg.loss.r1_every == 0
            stats = self.d_step(real, z, eps, real_labels, self.fake_labels(derive_seed(cfg.seed, step, 4, i)), r1,
                                keep_fake=reuse and i == cfg.train.n_critic - 1)
            skipped.append(self.D.skipped)
        if reuse:
            fake, labels = self.kept_fake
            self.kept_fake = None
            stats |= self.g_step(None, labels, fake=fake)
        else:
            stats |= self.g_step(global_draw(derive_seed(cfg.seed, step, 3), (gb, zd), env),
                                 self.fake_labels(derive_seed(cfg.seed, step, 5)))
        self.finish_step([*skipped, self.G.skipped], norm_stats)
        average_buffers(self.G.module, env)
        average_buffers(self.D.module, env)
        self.state.step += 1
        self.state.nimg += gb
        self.ema.update(unwrap(self.G.module), gb, self.state.nimg)
        return stats

    # -- outputs --------------------------------------------------------------------------------
    def write_samples(self, samples_dir: str, step: int) -> tuple[str, dict[str, float]]:
        """Grids (scatter plots for points) of the fixed latents from the raw G and its EMA."""
        centres = self.data.stream.index.meta.get("centres")
        raw = generate(unwrap(self.G.module), self.fixed_z, self.fixed_labels)
        save_samples(raw, os.path.join(samples_dir, f"step_{step:08d}_raw.png"), centres)
        images = generate(self.ema.model, self.fixed_z, self.fixed_labels) if self.cfg.train.ema_kimg > 0 else raw
        path = save_samples(images, os.path.join(samples_dir, f"step_{step:08d}.png"), centres)
        save_samples(images, os.path.join(samples_dir, "latest.png"), centres)
        return path, {}

    def export(self) -> dict[str, Any]:
        g = self.ema.model if self.cfg.train.ema_kimg > 0 else unwrap(self.G.module)
        return {"G_ema": g.state_dict()}

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"G_ema": self.ema.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any], path: str) -> None:
        super().load_state_dict(state, path)
        self.ema.model.load_state_dict(state["G_ema"])


def pick_checkpoint(cfg: Config, env: DistEnv) -> tuple[str, dict[str, Any]] | None:
    """Rank 0 chooses the checkpoint to resume from; every rank loads that same file."""
    from trainer.checkpoint import recover_checkpoints

    choice: list[Any] = [None]
    if env.is_main:
        recover_checkpoints(cfg.run.dir)
        if cfg.checkpoint.resume == "latest":
            found = load_latest(cfg.run.dir)
            choice[0] = found[0] if found else None
        elif cfg.checkpoint.resume != "none":
            choice[0] = cfg.checkpoint.resume
    if env.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    return (choice[0], read_checkpoint(choice[0])) if choice[0] else None


def read_init(location: str) -> tuple[str, dict[str, Any]]:
    """(path, state) of checkpoint.init_from: a run directory (its newest valid checkpoint) or a checkpoint."""
    if os.path.isdir(os.path.join(location, "checkpoints")):
        found = load_latest(location)
        if found is None:
            raise CheckpointError(f"checkpoint.init_from: no valid checkpoint in {location}/checkpoints")
        return found
    return location, read_checkpoint(location)


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
        self.ckpt_seen, self.checkpoints = 0.0, None
        self.sampled_step, self.last_grid = -1, None
        self._time_data(trainer.data)
        if getattr(trainer, "data_b", None):
            self._time_data(trainer.data_b)
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
                    "precision": trainer.precision, "mlflow.runName": cfg.run.name,
                    "mlflow.source.git.commit": build["commit"], "mlflow.source.name": "ganforge train",
                    "mlflow.source.type": "LOCAL"}
            self.tracker = MlflowTracker(uri, cfg.log.experiment, cfg.run.name, trainer.state.mlflow_run_id,
                                         applicable_params(redact(cfg)), tags, resume_step=resumed_step)
            self.tracker.log_datasets([{"location": redact(data.stream.index.root), "name": os.path.basename(
                redact(data.stream.index.root).rstrip("/")) or "shards", "digest": data.stream.index.fingerprint()}
                for data in (trainer.data, getattr(trainer, "data_b", None)) if data is not None])
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
        """Every step, on every rank, without a device sync: the /metrics counters."""
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

    def fetch_totals(self) -> dict[str, float]:
        """Every rank at a log step, for remote data: its own remote reads to /metrics, and for the
        metrics log the job's totals (summed over ranks, in float64 so byte counts stay exact)
        with this node's cache size. Empty for local data, on every rank alike."""
        t = self.t
        mine = t.data.fetch_metrics()
        if not mine:
            return {}
        if self.exporter:
            self.exporter.data_fetched(mine)
        counters = [k for k in mine if k != "data/cache_bytes"]
        sums = mean_across(torch.tensor([mine[k] for k in counters], dtype=torch.float64, device=t.env.device), t.env)
        totals = dict(zip(counters, (sums * t.env.world_size).tolist(), strict=True))
        return totals | {"data/cache_bytes": mine["data/cache_bytes"]}

    def log(self, stats: dict[str, torch.Tensor]) -> None:
        t = self.t
        step, cfg = t.state.step, t.cfg
        self._count_step(stats)
        if step % cfg.log.every_steps and step != cfg.train.max_steps:
            return
        values = {k: float(v) for k, v in zip(stats, mean_across(torch.stack(list(stats.values())), t.env).tolist(), strict=True)}
        t.settle_nonfinite()  # the device's skipped-step counts, now that this step syncs anyway
        values |= {f"lr/{p.name.lower()}": p.opt.param_groups[0]["lr"] for p in t.phases}
        values["train/nonfinite_steps"] = float(t.state.nonfinite)  # skipped steps, same on every rank
        if self.exporter:
            self.exporter.report(values, int(values["train/nonfinite_steps"]), t.env.device, t.data.epoch,
                                 skipped_samples=t.data.skipped)
        values |= self.fetch_totals()
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
        shown = "  ".join(f"{shown_name(k)}={v:.3f}" for k, v in values.items() if shown_name(k))
        log.info("step %d/%d  %s  %.0f img/s  %.1f kimg  epoch %d  ETA %s", step, cfg.train.max_steps, shown, ips,
                 t.state.nimg / 1000, t.data.epoch, clock(remaining))
        with open(os.path.join(cfg.run.dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tracker:
            self.tracker.log_metrics(values, step)

    def samples(self, final: bool = False) -> str | None:
        t = self.t
        step, cfg = t.state.step, t.cfg
        if not self.active or (step % cfg.log.sample_every_steps and not final) or step == self.sampled_step:
            return self.last_grid if final else None
        self.sampled_step = step
        path, values = t.write_samples(os.path.join(cfg.run.dir, "samples"), step)
        if path is None:
            return None
        self.last_grid = path
        if values:  # held-out measurements that come with the samples (e.g. translation L1)
            log.info("step %d: %s", step, "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
            with open(os.path.join(cfg.run.dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tracker:
            self.tracker.log_image(path, step)
            if values:
                self.tracker.log_metrics(values, step)
        return path

    def evaluate(self) -> dict[str, Any]:
        """Every rank: quality metrics of the EMA generator (eval.*); rank 0 logs them as eval/<name>."""
        from trainer.evaluation.evaluator import as_metrics, evaluate

        t, cfg = self.t, self.t.cfg
        started = time.perf_counter()
        result = evaluate(t.ema.model if cfg.train.ema_kimg > 0 else unwrap(t.G.module), cfg.eval.metrics,
                          cfg.eval.n, cfg=cfg, features=cfg.eval.features,
                          inception_weights=cfg.eval.inception_weights or None,
                          cache_dir=cfg.eval.cache_dir or None, env=t.env, log=lambda *_: None)
        values = as_metrics(result)
        if self.exporter:
            self.exporter.evaluated(values, str(result.get("features", cfg.eval.features)), t.state.step)
        if self.active:
            step = t.state.step
            shown = "  ".join(f"{k[5:]}={v:.4g}" for k, v in values.items())
            log.info("eval at step %d: %s  (%.1f s)", step, shown, time.perf_counter() - started)
            with open(os.path.join(cfg.run.dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")
            if self.tracker:
                self.tracker.log_metrics(values, step)
        self.last = (self.last[0] + time.perf_counter() - started, self.last[1])  # keep img/s honest
        return result

    def close(self, status: str) -> None:
        if self.tracker:
            self.tracker.log_artifact(os.path.join(self.t.cfg.run.dir, "config.yaml"))
            if status == "FINISHED":
                self.tracker.log_artifact(self.save_generator(), "model")
                self.tracker.log_model(*self.served_generator(), self.t.cfg.log.register_model)
            self.tracker.close(status)
        if self.exporter:
            self.exporter.close()

    def checkpoint_model(self) -> None:
        """At a checkpoint every log.model_every_steps (not the last step: close() logs that one),
        the EMA generator as an MLflow model `generator-step<N>`."""
        step, every = self.t.state.step, self.t.cfg.log.model_every_steps
        if self.tracker and every and step % every == 0 and step != self.t.cfg.train.max_steps:
            self.tracker.log_model(*self.served_generator(), step=step)

    def served_generator(self) -> tuple[nn.Module, torch.Tensor]:
        """A CPU copy of the final generator taking one tensor (ServedGenerator), and an input example."""
        t, model = self.t, self.t.cfg.model
        state = next(iter(t.export().values()))
        g, _ = build_models(model)
        if family(model.arch).takes == "image":
            g = g.g_ab if hasattr(g, "g_ab") else g  # CycleGAN: the A-to-B generator
            side = model.resolution // (model.scale if model.arch == "esrgan" else 1)  # esrgan takes LR images
            example = torch.rand(2, model.channels, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
            state = {k.removeprefix("g_ab."): v for k, v in state.items() if not k.startswith("g_ba.")}
        else:
            example = latents(0, 2, model.z_dim)
            if model.num_classes:
                example = torch.cat([example, class_cycle(2, model.num_classes).float()[:, None]], dim=1)
        g.load_state_dict({k: v.detach().float().cpu() for k, v in state.items()})
        return ServedGenerator(g.eval(), bool(model.num_classes)), example

    def save_generator(self) -> str:
        """run.dir/generator_ema.pt: the final generator(s) alone, loadable by `ganforge sample --checkpoint`."""
        t = self.t
        path = os.path.join(t.cfg.run.dir, "generator_ema.pt")
        torch.save({"step": t.state.step, "config": to_dict(redact(t.cfg)), **t.export()}, path)
        return path


def run_training(cfg: Config) -> dict[str, Any]:
    """Train per `cfg` in this process (one rank of the job); returns a summary on rank 0."""
    from trainer.run_lock import lock_run_dir

    env = init_distributed()
    lock = None
    try:
        lock = lock_run_dir(cfg.run.dir, env)  # one job per run.dir, before anything in it changes
        summary = _run(cfg, env)
        if env.world_size > 1:
            # Leave together: a rank tearing down gloo while a peer still talks to it can abort.
            dist.barrier()
        return summary
    finally:
        if lock:
            lock.release()
        shutdown()


def make_trainer(cfg: Config, env: DistEnv) -> TrainerBase:
    """The trainer for the config's model family (trainer/families.py)."""
    return family(cfg.model.arch).make_trainer(cfg, env)


def _run(cfg: Config, env: DistEnv) -> dict[str, Any]:
    from trainer.checkpoint import set_aside_newer
    from trainer.preemption import LOST_WORKER_ERRORS, data_marks, rewind_after_lost_worker

    trainer = make_trainer(cfg, env)
    resumed = pick_checkpoint(cfg, env)
    if resumed:
        trainer.load_state_dict(resumed[1], resumed[0])
    elif cfg.checkpoint.init_from:  # a fresh run only: once it has checkpoints of its own, it resumes from them
        path, state = read_init(cfg.checkpoint.init_from)
        trainer.init_weights(state, path)
        if env.is_main:
            log.info("initialised the networks from %s", cfg.checkpoint.init_from)
    if env.is_main:
        os.makedirs(cfg.run.dir, exist_ok=True)
        set_aside_newer(cfg.run.dir, trainer.state.step if resumed else 0)  # not this run's past
        with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(redact(cfg)))  # the running process keeps the real values
        where = f"resuming from {resumed[0]} at step {trainer.state.step}" if resumed else "starting"
        log.info("%s; world size %d on %s, precision %s, global batch %d", where, env.world_size, env.device.type,
                 trainer.precision, cfg.train.batch_size)
    reporter = Reporter(trainer, trainer.state.step if resumed else -1)
    if reporter.tracker:
        trainer.state.mlflow_run_id = reporter.tracker.wait_ready(timeout=30)

    ckpt = CheckpointManager(cfg.run.dir, cfg.checkpoint.keep, cfg.checkpoint.milestone_every,
                             resumed_from=resumed[0] if resumed else None)
    reporter.watch_checkpoints(ckpt)
    saved_step = trainer.state.step if resumed else -1

    def checkpoint(blocking: bool = False) -> None:
        nonlocal saved_step
        if saved_step != trainer.state.step:
            trainer.gather_state()
        if env.is_main and saved_step != trainer.state.step:
            ckpt.save(trainer.state.step, trainer.state_dict(), blocking)
            reporter.checkpoint_model()
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
        redone = -1
        while trainer.state.step < cfg.train.max_steps:
            marks = data_marks(trainer)
            try:
                stats = trainer.train_step()
            except LOST_WORKER_ERRORS as e:
                # A loader worker lost during a stop must not cost the checkpoint: if the step had
                # not started, run it again on fresh workers, then stop at its boundary as usual.
                if not (flag.requested and redone != trainer.state.step and rewind_after_lost_worker(e, marks)):
                    raise
                redone = trainer.state.step
                log.warning("%s; stopping, step %d runs again on new loader workers", e, redone)
                continue
            reporter.log(stats)
            reporter.samples()
            if trainer.state.step % cfg.checkpoint.every_steps == 0:
                checkpoint()
            if cfg.eval.every_steps and trainer.state.step % cfg.eval.every_steps == 0:
                reporter.evaluate()
            preempt, over_budget, save_failed = stop_votes(
                [flag.requested, budget > 0 and time.perf_counter() - start > budget, ckpt.failed], env)
            if save_failed:  # reported at the step after it happened, on every rank, not at the next save
                ckpt.check()
                raise CheckpointError(f"rank 0 could not save a checkpoint in {cfg.run.dir} (see its error)")
            if preempt:
                checkpoint(blocking=True)
                status = "KILLED"
                raise Preempted(trainer.state.step, flag.signum or 15)
            if over_budget:
                if env.is_main:
                    log.info("time budget of %s min reached at step %d", cfg.train.max_minutes, trainer.state.step)
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
        print(f"  MLflow:      mlflow ui --backend-store-uri {redact(s['mlflow_uri'])}   (run {s['mlflow_run_id']})")
    sys.stdout.flush()
