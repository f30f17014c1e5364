"""Per-rank Prometheus exporter: `/metrics` on `log.prometheus_port + LOCAL_RANK`.

Every process of a job serves its own registry with prometheus_client's HTTP server (no
multiprocess mode, no Pushgateway), so Prometheus scrapes each rank as its own target and
a dead rank shows up as a missing series. Labels are `rank`, `node` and `job` (the run name)
only: a step or run-id label would create a new series at every step or restart.

The exporter must never be the reason a run stops or slows down: a port already in use, or
any error while updating a metric, prints one warning and turns the exporter into a no-op.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)

log = logging.getLogger(__name__)

# Base units (seconds, bytes); step times from a few ms (tiny CPU models) to minutes.
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CHECKPOINT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BASE_LABELS = ("rank", "node", "job")
# DataCursor.fetch_metrics keys -> counters of remote shard reads (this rank and its loader workers).
FETCH_COUNTERS = {
    "data/bytes_fetched": ("ganforge_data_fetched_bytes_total", "Bytes of remote shards downloaded."),
    "data/requests": ("ganforge_data_fetch_requests_total", "HTTP requests for remote shards, retries included."),
    "data/retries": ("ganforge_data_fetch_retries_total", "Remote shard requests retried after a 5xx, timeout, reset or short body."),
    "data/fetch_seconds": ("ganforge_data_fetch_seconds_total", "Time spent downloading remote shards (prefetch threads included)."),
    "data/cache_hits": ("ganforge_data_cache_hits_total", "Shards found in the node cache."),
    "data/cache_misses": ("ganforge_data_cache_misses_total", "Shards this process downloaded into the node cache."),
}


def loss_labels(key: str) -> tuple[str, str] | None:
    """(network, term) for a loop statistic such as `loss/d`, `loss/gp` or `loss/g_cycle`."""
    if not key.startswith("loss/"):
        return None
    name = key[len("loss/"):]
    if name == "gp":  # the gradient penalty is part of D's objective
        return "D", "gp"
    network, _, term = name.partition("_")
    return network.upper(), term or "adversarial"


def device_memory_bytes(device: Any) -> int | None:
    """Memory held by this process on its device: CUDA allocations, or resident memory on CPU."""
    import torch

    if getattr(device, "type", None) == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _guarded(method: Callable) -> Callable:
    """Run a metric update; on any error warn once and disable the exporter instead of raising."""

    @functools.wraps(method)
    def wrapper(self: PrometheusExporter, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - telemetry must never end a training run
            self._disable(f"{method.__name__} failed ({type(e).__name__}: {e})")
            return None

    return wrapper


class PrometheusExporter:
    """This rank's metrics and the HTTP server that serves them."""

    def __init__(self, port: int, *, rank: int, job: str, world_size: int, device: Any = None,
                 node: str | None = None, build: dict[str, str] | None = None, addr: str | None = None):
        self.enabled, self.port, self.server = True, port, None
        disable_created_metrics()  # `*_created` series only add noise to every counter here
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, _resident_memory_bytes, ...
        base = {"rank": str(rank), "node": node or os.environ.get("NODE_NAME") or socket.gethostname(),
                "job": job}
        self.labels = base
        reg = self.registry

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, BASE_LABELS, registry=reg).labels(**base)

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, BASE_LABELS, registry=reg).labels(**base)

        self.steps = counter("ganforge_steps_total", "Training steps (one G update each) completed by this process.")
        self.step = gauge("ganforge_step", "Global training step, continued across restarts.")
        self.images = counter("ganforge_images_total", "Real images this rank fed to the discriminator.")
        self.step_seconds = Histogram("ganforge_step_seconds", "Wall time of one training iteration.",
                                      BASE_LABELS, registry=reg, buckets=STEP_BUCKETS).labels(**base)
        self.data_wait = counter("ganforge_data_wait_seconds_total", "Time spent waiting for the next batch.")
        self._loss = Gauge("ganforge_loss", "Loss per network and term, mean over ranks at the last log step.",
                           (*BASE_LABELS, "network", "term"), registry=reg)
        self._d_out = Gauge("ganforge_discriminator_output", "Mean D logit on real and on generated images.",
                            (*BASE_LABELS, "input"), registry=reg)
        self._grad_norm = Gauge("ganforge_grad_norm", "Gradient norm per network at the last log step.",
                                (*BASE_LABELS, "network"), registry=reg)
        self._lr = Gauge("ganforge_learning_rate", "Optimiser learning rate per network.",
                         (*BASE_LABELS, "network"), registry=reg)
        self.nonfinite = counter("ganforge_nonfinite_steps_total", "Steps whose losses were NaN or infinite.")
        self._nonfinite_seen = 0
        self.skipped = counter("ganforge_data_skipped_samples_total",
                               "Bad samples skipped and replaced (data.on_error=skip), summed over the job's "
                               "ranks: the same job-wide total on every rank.")
        self._skipped_seen = 0
        self._fetch = {key: counter(name, doc) for key, (name, doc) in FETCH_COUNTERS.items()}
        self._fetch_seen: dict[str, float] = {}
        self.cache_bytes = gauge("ganforge_data_cache_bytes", "Bytes of shards in this node's data.cache_dir.")
        self._eval = Gauge("ganforge_eval", "Latest in-training evaluation result (eval.every_steps) per metric "
                           "(fid, kid, ...) and feature extractor.", (*BASE_LABELS, "metric", "features"), registry=reg)
        self.eval_step = gauge("ganforge_eval_step", "Global step of the latest in-training evaluation.")
        self.checkpoint_seconds = Histogram("ganforge_checkpoint_seconds", "Time to write one checkpoint.",
                                            BASE_LABELS, registry=reg, buckets=CHECKPOINT_BUCKETS).labels(**base)
        self.last_checkpoint = gauge("ganforge_last_checkpoint_timestamp_seconds",
                                     "Unix time of the newest checkpoint (or of the start, before the first "
                                     "one): the point from which a crash would lose work.")
        self.memory = gauge("ganforge_device_memory_bytes",
                            "Memory this process holds on its device (CUDA allocations; resident memory on CPU).")
        self.restarts = counter("ganforge_restarts_total", "Restarts of this job before this process started.")
        self.world_size = gauge("ganforge_world_size", "Processes in the job.")
        self.epoch = gauge("ganforge_data_epoch", "Current data epoch.")
        build = dict(build or {})
        Gauge("ganforge_build_info", "Constant 1; labels describe the code and the run setup.",
              (*BASE_LABELS, *sorted(build)), registry=reg).labels(**base, **build).set(1)
        self.world_size.set(world_size)
        if (mem := device_memory_bytes(device)) is not None:
            self.memory.set(mem)
        # Loopback unless told otherwise: /metrics has no authentication (manifests set 0.0.0.0).
        addr = addr if addr is not None else os.environ.get("GANFORGE_METRICS_ADDR", "127.0.0.1")
        try:
            self.server, _ = start_http_server(port, addr=addr, registry=reg)
        except OSError as e:
            self._disable(f"cannot serve /metrics on {addr}:{port} ({e.strerror or e})")

    @classmethod
    def for_rank(cls, base_port: int, env: Any, job: str, build: dict[str, str]) -> PrometheusExporter | None:
        """The exporter of rank `env` (a DistEnv) on `base_port + env.local_rank`; None when `base_port` is 0."""
        if base_port <= 0:
            return None
        return cls(base_port + env.local_rank, rank=env.rank, job=job, world_size=env.world_size,
                   device=env.device, build=build)

    def _disable(self, why: str) -> None:
        self.enabled = False
        log.warning("Prometheus exporter disabled: %s (training continues)", why)

    # -- updates, each safe to call on any rank at any time ------------------------------------
    @_guarded
    def step_done(self, step: int, seconds: float | None, images: int, data_wait_s: float) -> None:
        """One iteration finished: count it, its images and its time waiting for data."""
        self.steps.inc()
        self.step.set(step)
        self.images.inc(images)
        self.data_wait.inc(max(data_wait_s, 0.0))
        if seconds is not None:
            self.step_seconds.observe(seconds)

    @_guarded
    def report(self, values: dict[str, float], nonfinite_steps: int, device: Any, epoch: int,
               skipped_samples: int = 0) -> None:
        """At a log step: losses, D outputs, gradient norms, learning rates, non-finite and skipped counts, memory."""
        for key, value in values.items():
            if (net_term := loss_labels(key)) is not None:
                self._loss.labels(**self.labels, network=net_term[0], term=net_term[1]).set(value)
            elif key in ("d/real", "d/fake"):
                self._d_out.labels(**self.labels, input=key[2:]).set(value)
            elif key.startswith("grad_norm/"):
                self._grad_norm.labels(**self.labels, network=key.split("/", 1)[1].upper()).set(value)
            elif key.startswith("lr/"):
                self._lr.labels(**self.labels, network=key.split("/", 1)[1].upper()).set(value)
        if nonfinite_steps > self._nonfinite_seen:  # the loop reports a running total
            self.nonfinite.inc(nonfinite_steps - self._nonfinite_seen)
            self._nonfinite_seen = nonfinite_steps
        if skipped_samples > self._skipped_seen:  # also a running total (of the whole job)
            self.skipped.inc(skipped_samples - self._skipped_seen)
            self._skipped_seen = skipped_samples
        if (mem := device_memory_bytes(device)) is not None:
            self.memory.set(mem)
        self.epoch.set(epoch)

    @_guarded
    def data_fetched(self, metrics: dict[str, float]) -> None:
        """Remote reads of this rank and its loader workers (DataCursor.fetch_metrics: running totals)."""
        for key, value in metrics.items():
            if key in self._fetch and value > self._fetch_seen.get(key, 0.0):
                self._fetch[key].inc(value - self._fetch_seen.get(key, 0.0))
                self._fetch_seen[key] = value
        if "data/cache_bytes" in metrics:
            self.cache_bytes.set(metrics["data/cache_bytes"])

    @_guarded
    def evaluated(self, values: dict[str, float], features: str, step: int) -> None:
        """After an in-training evaluation: `values` as eval/<metric> -> number."""
        for key, value in values.items():
            self._eval.labels(**self.labels, metric=key.removeprefix("eval/"), features=features).set(value)
        self.eval_step.set(step)

    @_guarded
    def checkpoint_saved(self, seconds: float | None, timestamp: float) -> None:
        if seconds is not None:
            self.checkpoint_seconds.observe(seconds)
        self.last_checkpoint.set(timestamp)

    @_guarded
    def restarted(self, times: int) -> None:
        if times > 0:
            self.restarts.inc(times)

    def close(self) -> None:
        """Stop serving (the last values stay readable until the process exits otherwise)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def restart_count(resumed: bool) -> int:
    """Restarts before this process: torchrun's count, or at least 1 when resuming a checkpoint."""
    try:
        elastic = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        elastic = 0
    return max(elastic, 1 if resumed else 0)
