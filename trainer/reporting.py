"""What a run reports: the progress line, sample grids and evaluations, and the sinks that take
each record of numbers: metrics.jsonl, MLflow and Prometheus, behind one `log(values, step)`."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from typing import Any, Protocol

import torch
from torch import nn

from data_pipeline.progress import clock
from trainer import __version__
from trainer.checkpoint import CheckpointManager
from trainer.config import to_dict
from trainer.core import TrainerBase
from trainer.distributed import mean_across
from trainer.families import applicable_params, family
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


class Sink(Protocol):
    """Where a record of the run's numbers goes: `values` by metric name, at training step `step`."""

    def log(self, values: dict[str, float], step: int) -> None: ...


class MetricsFile:
    """run.dir/metrics.jsonl (rank 0): one JSON object per record, {"step": step, **values}."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "metrics.jsonl")

    def log(self, values: dict[str, float], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")


class MlflowSink:
    """The MLflow run's metrics (rank 0; MlflowTracker sends them from its background thread)."""

    def __init__(self, tracker: MlflowTracker):
        self.tracker = tracker

    def log(self, values: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(values, step)


class PrometheusSink:
    """This rank's /metrics gauges for a log step's training values (losses, D outputs, gradient
    norms, learning rates, the running total of non-finite steps), with the process's own state
    at that moment: device memory, data epoch, skipped samples (of `data`, the training stream).

    Only the training record comes here. Per-step counters (exporter.step_done) arrive every
    step, not at log steps, and checkpoint times when a save completes: neither is a record of
    the run's metrics. An evaluation's gauges carry the feature extractor as a label, which a
    record of numbers has no room for, so it goes to exporter.evaluated directly.
    """

    def __init__(self, exporter: PrometheusExporter, device: torch.device, data: Any):
        self.exporter, self.device, self.data = exporter, device, data

    def log(self, values: dict[str, float], step: int) -> None:
        self.exporter.report(values, int(values["train/nonfinite_steps"]), self.device, self.data.epoch,
                             skipped_samples=self.data.skipped)


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Reporter:
    """Rank 0's progress line, sample grids, metrics.jsonl and MLflow; every rank's /metrics exporter.

    `live` holds the sinks of every rank (Prometheus), which take the training values of a log
    step; `records` holds rank 0's (metrics.jsonl, MLflow), which take every record of the run:
    the log step's values with throughput and progress, held-out figures that come with the
    samples, evaluations.
    """

    def __init__(self, trainer: TrainerBase, resumed_step: int):
        self.t = trainer
        cfg, env = trainer.cfg, trainer.env
        self.active = env.is_main
        self.tracker: MlflowTracker | None = None
        self.uri: str | None = None  # the MLflow tracking URI, when MLflow is on
        self.t0 = time.perf_counter()
        self.last = (self.t0, trainer.state.step)
        self.iter_mark: float | None = None  # end of the previous iteration (start: first batch request)
        self.wait_window = 0.0  # data wait since the last log step
        self.ckpt_seen, self.checkpoints = 0.0, None
        self.sampled_step, self.last_grid = -1, None
        self.live: list[Sink] = []
        self.records: list[Sink] = []
        for data in trainer.datasets():
            data.take_waits()  # timed from here on, as the loop's iterations are
        build = {"version": __version__, "commit": git_commit(), "torch": torch.__version__,
                 "device": env.device.type, "precision": trainer.precision}
        self.exporter = PrometheusExporter.for_rank(cfg.log.prometheus_port, env, cfg.run.name, build)
        if self.exporter:
            self.exporter.restarted(restart_count(resumed_step >= 0))
            self.exporter.checkpoint_saved(None, time.time())  # nothing to lose yet
            self.live.append(PrometheusSink(self.exporter, env.device, trainer.data))
        if not self.active:
            return
        self.records.append(MetricsFile(cfg.run.dir))
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
                for data in trainer.datasets()])
            self.records.append(MlflowSink(self.tracker))
            self.uri = uri

    def watch_checkpoints(self, manager: CheckpointManager) -> None:
        """Report the saves of `manager` (duration, time) on /metrics as they complete."""
        self.checkpoints = manager

    def _count_step(self) -> None:
        """Every step, on every rank, without a device sync: the /metrics counters.

        An iteration lasts from the end of the previous one (the first: from its first batch
        request) to now; its data wait is the time spent in the cursors' next() meanwhile."""
        now = time.perf_counter()
        waits = [data.take_waits() for data in self.t.datasets()]
        data_wait, images = sum(w.seconds for w in waits), sum(w.images for w in waits)
        if self.iter_mark is None:
            self.iter_mark = min((w.first_request for w in waits if w.first_request is not None), default=None)
        self.wait_window += data_wait
        if self.exporter:
            seconds = now - self.iter_mark if self.iter_mark is not None else None
            self.exporter.step_done(self.t.state.step, seconds, images, data_wait)
            done = getattr(self.checkpoints, "last_time", 0.0)
            if done > self.ckpt_seen:  # a background save finished since the last step
                self.ckpt_seen = done
                self.exporter.checkpoint_saved(self.checkpoints.last_write_s, done)
        self.iter_mark = now

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

    @staticmethod
    def emit(sinks: list[Sink], values: dict[str, float], step: int) -> None:
        for sink in sinks:
            sink.log(values, step)

    def log(self, stats: dict[str, torch.Tensor]) -> None:
        """Every step, every rank: the step counters; at a log step (and the last) the training
        values (means over ranks) to every sink, and rank 0's training line."""
        t = self.t
        step, cfg = t.state.step, t.cfg
        self._count_step()
        if step % cfg.log.every_steps and step != cfg.train.max_steps:
            return
        stacked = torch.stack(list(stats.values()))  # promoted to the values' float dtype (bool flags: 0/1)
        values = {k: float(v) for k, v in zip(stats, mean_across(stacked, t.env).tolist(), strict=True)}
        t.settle_nonfinite()  # the device's skipped-step counts, now that this step syncs anyway
        values |= {f"lr/{p.name.lower()}": p.opt.param_groups[0]["lr"] for p in t.phases}
        values["train/nonfinite_steps"] = float(t.state.nonfinite)  # skipped steps, same on every rank
        self.emit(self.live, values, step)
        values |= self.fetch_totals()
        if self.active:
            values |= self._progress(values)
            self.emit(self.records, values, step)

    def _progress(self, values: dict[str, float]) -> dict[str, float]:
        """Rank 0 at a log step: throughput, progress and data figures, and the training line."""
        t = self.t
        step, cfg = t.state.step, t.cfg
        now = time.perf_counter()
        dt, dsteps = now - self.last[0], step - self.last[1]
        self.last = (now, step)
        ips = dsteps * cfg.train.batch_size * cfg.train.n_critic / max(dt, 1e-9)
        progress = {"perf/images_per_s": ips, "progress/kimg": t.state.nimg / 1000,
                    "data/epoch": t.data.epoch, "data/skipped": t.data.skipped,
                    "perf/data_wait_fraction": min(1.0, self.wait_window / max(dt, 1e-9))}
        self.wait_window = 0.0
        remaining = (cfg.train.max_steps - step) * dt / max(dsteps, 1)
        shown = "  ".join(f"{shown_name(k)}={v:.3f}" for k, v in values.items() if shown_name(k))
        log.info("step %d/%d  %s  %.0f img/s  %.1f kimg  epoch %d  ETA %s", step, cfg.train.max_steps, shown, ips,
                 t.state.nimg / 1000, t.data.epoch, clock(remaining))
        return progress

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
        if self.tracker:
            self.tracker.log_image(path, step)
        if values:  # held-out measurements that come with the samples (e.g. translation L1)
            log.info("step %d: %s", step, "  ".join(f"{k}={v:.4g}" for k, v in values.items()))
            self.emit(self.records, values, step)
        return path

    def evaluation_due(self, step: int) -> bool:
        """Whether the run evaluates at `step` (eval.every_steps; 0: never)."""
        every = self.t.cfg.eval.every_steps
        return bool(every) and step % every == 0

    def evaluate(self) -> dict[str, Any]:
        """Every rank: quality metrics of the EMA generator (eval.*); rank 0 logs them as eval/<name>."""
        from trainer.evaluation.evaluator import as_metrics, evaluate

        t, cfg = self.t, self.t.cfg
        started = time.perf_counter()
        result = evaluate(t.generator(), cfg.eval.metrics,
                          cfg.eval.n, cfg=cfg, features=cfg.eval.features,
                          inception_weights=cfg.eval.inception_weights or None,
                          cache_dir=cfg.eval.cache_dir or None, env=t.env, log=lambda *_: None)
        values = as_metrics(result)
        if self.exporter:  # not a sink: the extractor's name is a label (see PrometheusSink)
            self.exporter.evaluated(values, str(result.get("features", cfg.eval.features)), t.state.step)
        if self.active:
            step = t.state.step
            shown = "  ".join(f"{k[5:]}={v:.4g}" for k, v in values.items())
            log.info("eval at step %d: %s  (%.1f s)", step, shown, time.perf_counter() - started)
            self.emit(self.records, values, step)
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
        chosen = family(model.arch)
        if chosen.takes == "image":
            g = g.g_ab if hasattr(g, "g_ab") else g  # CycleGAN: the A-to-B generator
            side = chosen.input_side(model)
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

