"""`ganforge runs ...`: list the runs of an MLflow store and compare a few of them."""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from trainer.redact import redact

DEFAULT_URI = "sqlite:///runs/mlflow.db"
# Which way is better, by a fragment of the metric name; metrics matching neither get no "best".
LOWER_IS_BETTER = ("loss", "fid", "kid", "wait", "nonfinite")
HIGHER_IS_BETTER = ("precision", "recall", "images_per_s", "modes", "high_quality")
# Curves worth overlaying: losses, D outputs, gradient norms (by prefix) and sample quality.
PLOTTED_PREFIXES = ("loss/", "d/", "grad_norm/")
QUALITY = ("fid", "kid", "precision", "recall", "modes", "high_quality")


class RunsError(Exception):
    """A store or run that cannot be used; the message names it."""


@dataclass
class RunView:
    """One MLflow run with the histories `compare` needs."""

    run_id: str
    name: str
    params: dict[str, str]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run_id[:8]})"


def add_parser(sub: argparse._SubParsersAction) -> None:
    runs = sub.add_parser("runs", help="list and compare tracked runs (MLflow)")
    rsub = runs.add_subparsers(dest="runs_cmd", required=True)
    uri_help = f"MLflow tracking URI (default $MLFLOW_TRACKING_URI, else {DEFAULT_URI})"

    p = rsub.add_parser("list", help="one line per run: id, name, status, steps, last losses")
    p.add_argument("--tracking-uri", help=uri_help)
    p.set_defaults(func=list_runs)

    p = rsub.add_parser("compare", help="the params that differ and final/best metrics; --plot overlays curves")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run id or run name")
    p.add_argument("--tracking-uri", help=uri_help)
    p.add_argument("--plot", metavar="OUT.png", help="write the loss and quality curves of the runs here")
    p.set_defaults(func=compare_runs)


def tracking_uri(arg: str | None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else runs/mlflow.db; a missing sqlite file is an error."""
    uri = arg or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):]):
        # MLflow would silently create an empty store; a typo deserves an error instead.
        raise RunsError(f"no MLflow store at {uri[len('sqlite:///'):]} (train a run first, or pass --tracking-uri)")
    return uri


def _client(uri: str) -> Any:
    from trainer.telemetry.mlflow import open_client

    return open_client(uri)


def _all_runs(client: Any, filter_string: str = "") -> list[Any]:
    from mlflow.entities import ViewType

    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    return client.search_runs(ids, filter_string, order_by=["attributes.start_time DESC"]) if ids else []


def find_run(client: Any, key: str, uri: str) -> Any:
    """The run whose id is `key`, else the one run named `key`."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(key)
    except MlflowException:
        pass
    quoted = key.replace("'", "\\'")
    found = _all_runs(client, f"tags.`mlflow.runName` = '{quoted}'")
    if not found:
        raise RunsError(f"{key}: no run with this id or name in {uri}")
    if len(found) > 1:
        ids = ", ".join(r.info.run_id for r in found)
        raise RunsError(f"{key}: {len(found)} runs have this name ({ids}); give a run id")
    return found[0]


def load_view(client: Any, run: Any) -> RunView:
    view = RunView(run.info.run_id, run.info.run_name or run.info.run_id, dict(run.data.params))
    for key in sorted(run.data.metrics):
        points = client.get_metric_history(run.info.run_id, key)
        view.history[key] = sorted((m.step, m.value) for m in points)
    return view


def direction(metric: str) -> int:
    """-1 when lower is better, +1 when higher is, 0 when neither is meaningful."""
    if any(f in metric for f in LOWER_IS_BETTER):
        return -1
    if any(f in metric for f in HIGHER_IS_BETTER):
        return 1
    return 0


def final_and_best(points: list[tuple[int, float]], metric: str) -> tuple[float, float | None]:
    values = [v for _, v in points if math.isfinite(v)]
    final = points[-1][1]
    d = direction(metric)
    if d == 0 or not values:
        return final, None
    return final, (min(values) if d < 0 else max(values))


def table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}"


def comparison(views: list[RunView]) -> str:
    """The params that differ between `views`, then each metric's final (and best) value per run."""
    header = [v.label for v in views]
    keys = sorted(set().union(*(v.params for v in views)))
    differ = [k for k in keys if len({v.params.get(k) for v in views}) > 1]
    out = []
    if differ:
        out.append(table([["param", *header]] + [[k, *(v.params.get(k, "-") for v in views)] for k in differ]))
    else:
        out.append("params: identical")
    metrics = sorted(set().union(*(v.history for v in views)), key=lambda m: (not m.startswith("loss/"), m))
    rows = [["metric: final (best)", *header]]
    rows.append(["steps", *(str(max((p[-1][0] for p in v.history.values() if p), default=0)) for v in views)])
    for m in metrics:
        cells = []
        for v in views:
            if not v.history.get(m):
                cells.append("-")
                continue
            final, best = final_and_best(v.history[m], m)
            cells.append(_fmt(final) + (f" ({_fmt(best)})" if best is not None else ""))
        rows.append([m, *cells])
    out.append(table(rows))
    return "\n\n".join(out)


def plot(views: list[RunView], path: str) -> str:
    """Overlay each run's loss and quality curves, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted({m for v in views for m in v.history
                      if m.startswith(PLOTTED_PREFIXES) or any(q in m for q in QUALITY)})
    if not metrics:
        raise RunsError("nothing to plot: none of the runs logged a loss or quality metric")
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics, strict=False):
        for v in views:
            if v.history.get(m):
                steps, values = zip(*v.history[m], strict=True)
                ax.plot(steps, values, label=v.label, linewidth=1.4)
        ax.set_title(m)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def list_runs(args: argparse.Namespace) -> int:
    try:
        uri = tracking_uri(args.tracking_uri)
        client = _client(uri)
        runs = _all_runs(client)
    except RunsError as e:
        print(f"ganforge: error: {redact(str(e))}", file=sys.stderr)
        return 1
    if not runs:
        print(f"no runs in {redact(uri)}")
        return 0
    exp_names = {e.experiment_id: e.name for e in client.search_experiments()}
    rows = [["run id", "name", "experiment", "status", "started", "steps", "loss/d", "loss/g"]]
    for r in runs:
        steps = max((m.step for m in client.get_metric_history(r.info.run_id, "loss/g")), default=0)
        started = datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        rows.append([r.info.run_id, r.info.run_name or "-", exp_names.get(r.info.experiment_id, "?"),
                     r.info.status, started, str(steps), _fmt(r.data.metrics.get("loss/d")),
                     _fmt(r.data.metrics.get("loss/g"))])
    print(table(rows))
    return 0


def compare_runs(args: argparse.Namespace) -> int:
    try:
        uri = tracking_uri(args.tracking_uri)
        client = _client(uri)
        views = [load_view(client, find_run(client, key, uri)) for key in args.runs]
        print(comparison(views))
        if args.plot:
            print(f"\nplot: {plot(views, args.plot)}")
    except RunsError as e:
        print(f"ganforge: error: {redact(str(e))}", file=sys.stderr)
        return 1
    return 0
