"""MLflow tracking from rank 0, in a background thread so a slow or absent server never stalls training."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
import time
import warnings
from typing import Any

from trainer.redact import redact

log = logging.getLogger(__name__)


def default_tracking_uri(run_dir: str) -> str:
    """sqlite:///<parent of run.dir>/mlflow.db, e.g. runs/mlflow.db for run.dir=runs/demo."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    return f"sqlite:///{os.path.join(parent, 'mlflow.db')}"


@contextlib.contextmanager
def store_init_lock(uri: str):
    """Serialise the first use of a sqlite store across processes.

    MLflow creates and migrates the schema on first use; two runs (or `ganforge runs list`)
    doing that at the same moment leave the database half-migrated and unusable.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = uri[len("sqlite:///"):] + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_client(uri: str):
    """An MlflowClient whose store is created (and migrated) under the init lock."""
    from mlflow.tracking import MlflowClient

    with store_init_lock(uri):  # the client's constructor creates and migrates the store
        return MlflowClient(tracking_uri=uri)


def resolve_tracking_uri(configured: str, run_dir: str) -> str | None:
    """log.mlflow_uri, else $MLFLOW_TRACKING_URI, else the sqlite default; None when disabled."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "") or default_tracking_uri(run_dir)
    return None if uri.lower() == "none" else uri


def dataset_input(dataset: dict[str, Any]):
    """An MLflow DatasetInput (context `training`) for a shard directory: its location, name and digest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # a local path matches MLflow's two local sources; either is right
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(dataset["location"])
    meta = MetaDataset(source, name=dataset["name"], digest=dataset["digest"][:36])
    return DatasetInput(meta._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])


def log_evaluation(uri: str, run_id: str, values: dict[str, float], step: int, features: str) -> None:
    """`ganforge eval` results into the training run: metrics at `step`, the extractor as a tag."""
    from mlflow.entities import Metric, RunTag

    # The results are printed already: a server that is down costs seconds, not MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    client = open_client(uri)
    ts = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()],
                     tags=[RunTag("eval.features", features)])


class MlflowTracker:
    """Queue-fed MLflow client. Calls return at once; the worker thread retries on errors."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None = None,
                 params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                 resume_step: int = -1):
        self.uri = uri
        self.run_id: str | None = run_id
        self._queue: queue.Queue = queue.Queue()
        self._ready = threading.Event()
        self._warned = False
        self._skip_through = resume_step
        self._thread = threading.Thread(
            target=self._work, args=(experiment, run_name, params or {}, tags or {}), daemon=True,
            name="ganforge-mlflow")
        self._thread.start()

    # -- public, called from the training loop -------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._queue.put(("metrics", dict(metrics), step, int(time.time() * 1000)))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", path, artifact_path, 0))

    def log_image(self, path: str, step: int) -> None:
        """A sample grid (PNG) as the run's `samples` image at `step`."""
        self._queue.put(("image", path, step, 0))

    def log_datasets(self, datasets: list[dict[str, Any]]) -> None:
        """Shard directories as the run's training inputs: dicts with location, name and digest."""
        self._queue.put(("datasets", datasets, None, 0))

    def log_model(self, generator: Any, example: Any, registered_name: str = "", step: int | None = None) -> None:
        """The generator (on CPU, in eval mode) as an MLflow PyTorch model: the final one is named
        `generator`; one logged during training (`step` given) is `generator-step<step>`, at that step."""
        self._queue.put(("model", generator, (example, registered_name, step), 0))

    def wait_ready(self, timeout: float = 60.0) -> str | None:
        """The run id once the run exists (None if the store could not be reached in time)."""
        self._ready.wait(timeout)
        return self.run_id

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until everything queued before this call has been handled (sent, or given up after
        its retries), at most `timeout` seconds; whether it was."""
        handled = threading.Event()
        self._queue.put(("flush", handled, None, 0))
        return handled.wait(timeout)

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> None:
        """Flush what is queued (bounded by `timeout`) and mark the run ended."""
        self._queue.put(("end", status, None, 0))
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._warn(f"could not flush to {self.uri} within {timeout:.0f} s; some points were not logged")

    # -- worker thread --------------------------------------------------------------------------
    def _warn(self, msg: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("MLflow: %s (training continues; retrying)", redact(msg))

    def _retry(self, fn, *args, attempts: int = 5):
        for i in range(attempts):
            try:
                return fn(*args)
            except Exception as e:  # noqa: BLE001 - any store failure is retried, never raised
                self._warn(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                time.sleep(min(10.0, 0.5 * 2**i))
        return None

    def _open(self, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]):
        from mlflow.entities import Param, RunTag

        client = open_client(self.uri)
        if self.run_id is None:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                artifacts = None
                if self.uri.startswith("sqlite:///"):
                    root = os.path.dirname(self.uri[len("sqlite:///"):])
                    artifacts = "file://" + os.path.join(root, "mlartifacts")
                exp_id = client.create_experiment(experiment, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
            run = client.create_run(exp_id, run_name=run_name, tags=redact(tags))
            self.run_id = run.info.run_id
            items = [Param(k, str(v)[:6000]) for k, v in sorted(redact(params).items())]
            for i in range(0, len(items), 100):
                client.log_batch(self.run_id, params=items[i:i + 100])
        else:
            client.update_run(self.run_id, status="RUNNING")
            # Points logged after the checkpoint we resumed from are not logged twice.
            history = client.get_metric_history(self.run_id, "loss/g")
            self._skip_through = max([self._skip_through] + [m.step for m in history])
            client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in redact(tags).items() if k != "mlflow.runName"])
        return client

    def _log_image(self, client, path: str, step: int) -> None:
        from PIL import Image

        with Image.open(path) as img:
            client.log_image(self.run_id, img.convert("RGB"), key="samples", step=step)

    def _log_model(self, generator: Any, example: Any, registered_name: str, step: int | None) -> None:
        import mlflow
        import torch
        from mlflow.models import infer_signature

        from trainer import __version__

        with torch.no_grad():
            output = generator(example).numpy()
        mlflow.set_tracking_uri(self.uri)
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the summary names the run
        with mlflow.start_run(run_id=self.run_id):
            mlflow.pytorch.log_model(
                generator, name="generator" if step is None else f"generator-step{step}", step=step or 0,
                signature=infer_signature(example.numpy(), output),
                input_example=example.numpy(), registered_model_name=registered_name or None,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"ganforge=={__version__}"])

    def _work(self, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> None:
        client = self._retry(self._open, experiment, run_name, params, tags, attempts=8)
        self._ready.set()
        from mlflow.entities import Metric

        while True:
            kind, a, b, ts = self._queue.get()
            if kind == "flush":
                a.set()
                continue
            if client is None:
                if kind == "end":
                    return
                continue
            if kind == "metrics":
                if b <= self._skip_through:  # already logged before the resume
                    continue
                metrics = [Metric(k, float(v), ts, b) for k, v in a.items()]
                self._retry(lambda m=metrics: client.log_batch(self.run_id, metrics=m))
            elif kind == "artifact":
                self._retry(client.log_artifact, self.run_id, a, b)
            elif kind == "image":
                self._retry(self._log_image, client, a, b)
            elif kind == "datasets":
                self._retry(client.log_inputs, self.run_id, [dataset_input(d) for d in a])
            elif kind == "model":
                self._retry(self._log_model, a, *b, attempts=2)
            elif kind == "end":
                self._retry(client.set_terminated, self.run_id, a)
                return
