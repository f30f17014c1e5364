"""What a run reports: the progress line, metrics.jsonl, MLflow and Prometheus, sample grids and evaluations."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from typing import Any

import torch
from torch import nn

from data_pipeline.progress import clock
from trainer import __version__
from trainer.checkpoint import CheckpointManager
from trainer.config import applicable_params, to_dict
from trainer.core import TrainerBase
from trainer.data import DataCursor
from trainer.distributed import (
    mean_across,
    unwrap,
)
from trainer.families import family
from trainer.models import build_models
from trainer.redact import redact
from trainer.sampling import ServedGenerator, class_cycle, latents
from trainer.telemetry.mlflow import MlflowTracker, resolve_tracking_uri
from trainer.telemetry.prometheus import PrometheusExporter, restart_count

log = logging.getLogger(__name__)

# The training line's names for the statistics every family reports; other losses show as loss_<name>.
SHOWN = {"loss/d": "loss_d", "d/real": "D(real)", "d/fake": "D(fake)", "loss/g": "loss_g"}


def shown_name(key: str) -> str | None:
    """How a statistic is named on the training line (None: not shown there)."""
    return SHOWN.get(key) or (f"loss_{key[5:]}" if key.startswith("loss/") else None)

def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Reporter:
    """Rank 0's progress line, sample grids and MLflow; every rank's /metrics exporter."""

    def __init__(self, trainer: TrainerBase, resumed_step: int):
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

