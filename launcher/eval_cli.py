"""`ganforge eval`: FID, KID, precision/recall and mode coverage of a run, on one process or many."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="sample-quality metrics of a run (FID, KID, precision/recall, modes)")
    p.add_argument("--run", required=True, help="run directory (its newest valid checkpoint is evaluated)")
    p.add_argument("--metrics", default="fid", help="comma-separated: fid,kid,pr,modes,classes,stacked (default fid); psnr,ssim for an esrgan run")
    p.add_argument("--n", type=int, default=None,
                   help="generated samples (default: eval.n of the run, else 5000; Stacked-MNIST modes: 26000)")
    p.add_argument("--json", action="store_true", help="print one JSON object keyed by metric name")
    p.add_argument("--seed", type=int, default=0, help="latents of sample i are row i of this seed's draw")
    p.add_argument("--checkpoint", help="a checkpoint file (default: the newest valid one of --run)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the raw generator instead of its EMA")
    p.add_argument("--data", help="real data (default: the run's data.train)")
    p.add_argument("--features", default="auto", choices=["auto", "inception", "digits", "stacked", "points"],
                   help="feature extractor (auto: Inception if weights are given, else the dataset's classifier)")
    p.add_argument("--inception-weights", help="Inception-v3 state dict (eval.inception_weights); see docs/evaluation.md")
    p.add_argument("--cache-dir", help="classifier and real-feature cache (default: <parent of run>/eval_cache)")
    p.add_argument("--nproc", type=int, default=1, help="evaluate with this many processes (torchrun, gloo on CPU)")
    p.add_argument("--tracking-uri", help="MLflow store of the run's MLflow run (default: its log.mlflow_uri, "
                                          "else $MLFLOW_TRACKING_URI, else the sqlite default); none: do not log")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch(args)
    from data_pipeline.progress import bar, silent
    from trainer.distributed import init_distributed, shutdown
    from trainer.evaluation.errors import EvaluationError
    from trainer.evaluation.evaluator import evaluate

    env = init_distributed()
    try:
        result = evaluate(args.run, args.metrics, args.n, data=args.data, checkpoint=args.checkpoint,
                          use_ema=not args.no_ema, seed=args.seed, features=args.features,
                          inception_weights=args.inception_weights, cache_dir=args.cache_dir, env=env,
                          log=log.info, progress=bar if env.rank == 0 else silent)
    except EvaluationError as e:
        if env.rank == 0:  # every rank fails alike; one line is enough
            print(f"ganforge: error: {e}", file=sys.stderr)
        return 1
    finally:
        shutdown()
    if env.rank == 0:
        print(json.dumps(result) if args.json else format_result(result), flush=True)
        log_to_run(args, result)
    return 0


def log_to_run(args: argparse.Namespace, result: dict) -> None:
    """The metrics as eval/<name> of the checkpoint's MLflow run, at the checkpoint's step."""
    from trainer.evaluation.evaluator import as_metrics
    from trainer.generate import load_checkpoint_state
    from trainer.redact import redact
    from trainer.telemetry.mlflow import log_evaluation, resolve_tracking_uri

    _, state, cfg = load_checkpoint_state(args.run, result.get("checkpoint") or args.checkpoint)
    run_id = state.get("mlflow_run_id")
    uri = resolve_tracking_uri(args.tracking_uri or cfg.log.mlflow_uri, args.run)
    if not run_id or not uri:
        return
    try:
        log_evaluation(uri, run_id, as_metrics(result), int(state["step"]), str(result.get("features", "")))
    except Exception as e:  # noqa: BLE001 - the metrics are printed already; the store is optional
        log.warning("MLflow: could not log to run %s at %s: %s: %s", run_id, redact(uri), type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "")
        return
    log.info("logged to MLflow run %s at step %d", run_id, int(state["step"]))


def _relaunch(args: argparse.Namespace) -> int:
    """Run this same evaluation under torchrun with `args.nproc` processes (one rank each)."""
    argv = ["eval", "--run", args.run, "--metrics", args.metrics, "--seed", str(args.seed),
            "--features", args.features]
    for flag, value in (("--n", args.n), ("--checkpoint", args.checkpoint), ("--data", args.data),
                        ("--inception-weights", args.inception_weights), ("--cache-dir", args.cache_dir),
                        ("--tracking-uri", args.tracking_uri)):
        if value is not None:
            argv += [flag, str(value)]
    argv += ["--json"] * args.json + ["--no-ema"] * args.no_ema
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "launcher.cli", "--", *argv]  # "--": torchrun would take --run for its --run-path
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.call(cmd, env=env)


def format_result(result: dict) -> str:
    """Aligned `name  value` lines, numbers first."""
    lines = []
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.6g}" if math.isfinite(v) else str(v)
        lines.append(f"{k:<20} {v}")
    return "\n".join(lines)
