"""`evaluate`: sample-quality metrics of a run (or a generator), on one rank or many."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.index import load_index
from data_pipeline.progress import Progress, silent
from trainer.config import EVAL_METRICS
from trainer.distributed import DistEnv, pick_device
from trainer.evaluation.errors import EvaluationError
from trainer.evaluation.features import build_extractor
from trainer.evaluation.sharding import generated_features
from trainer.evaluation.stacked_mnist import PROTOCOL_SAMPLES, is_stacked, stacked_mode_metrics

METRICS = EVAL_METRICS  # one list for the CLI and the config
MODE_POINTS = 2500  # the PacGAN protocol's sample count for the 2-D mode metric
PR_K = 3
DEFAULT_N = 5000


def current_env() -> DistEnv:
    """This process's place in an already initialised process group, or a single process."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local, pick_device(local))
    return DistEnv(0, 1, 0, pick_device(0))


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """"fid,kid" or ["fid", "kid"] -> validated, de-duplicated metric names."""
    names = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    for m in names:
        if m not in METRICS:
            raise EvaluationError(f"--metrics: unknown metric {m!r} (choose from {', '.join(METRICS)})")
    if not names:
        raise EvaluationError("--metrics: no metric given")
    return list(dict.fromkeys(names))


def default_cache_dir(run_dir: str) -> str:
    """Caches sit beside the runs (<parent of run dir>/eval_cache), shared by runs on the same data."""
    return os.path.join(os.path.dirname(os.path.abspath(run_dir)) or ".", "eval_cache")


def evaluate(source: str | nn.Module, metrics: str | Sequence[str] = ("fid",), n: int | None = None, *,
             cfg: Any = None, data: str | None = None, checkpoint: str | None = None,
             use_ema: bool = True, seed: int = 0, features: str = "auto",
             inception_weights: str | None = None, cache_dir: str | None = None,
             env: DistEnv | None = None, log=print, progress: Progress = silent) -> dict[str, Any]:
    """Metrics of a run directory's newest checkpoint (or of `source` as a generator, with its `cfg`).

    Every rank of the current process group must call this with the same arguments: each
    generates its share of the n samples, the features are gathered, rank 0 computes, and every
    rank gets the same dict back. The result does not depend on the world size. `progress` (e.g.
    data_pipeline.progress.bar) shows generation and real-feature extraction.
    `n` defaults to the config's `eval.n` when it has one, else DEFAULT_N. Mode counting follows
    the PacGAN protocol: 2,500 samples on 2-D mixtures, and on Stacked MNIST `n` when given,
    else 26,000.
    """
    names = parse_metrics(metrics)
    if {"psnr", "ssim"} & set(names):
        if not set(names) <= {"psnr", "ssim"} or not isinstance(source, str):
            raise EvaluationError("--metrics psnr,ssim measure a super-resolution run on held-out images; "
                                  "ask for them alone, of an esrgan run directory")
        from trainer.families.esrgan import evaluate_upscaling

        return evaluate_upscaling(source, data, checkpoint, use_ema, n)
    env = env or current_env()
    info: dict[str, Any] = {}
    if isinstance(source, str):
        from trainer.generate import load_generator

        g, cfg, path = load_generator(source, checkpoint, use_ema)
        run_dir = source
        info["checkpoint"] = path
        step = re.search(r"step_(\d+)", os.path.basename(path))
        if step:
            info["step"] = int(step.group(1))
    else:
        if cfg is None:
            raise EvaluationError("evaluate(generator, ...) needs the run's cfg (for z_dim and the data)")
        g, run_dir = source, cfg.run.dir
    g = g.to(env.device)
    data = data or cfg.data.train
    if not data or ("://" not in data and not os.path.exists(os.path.join(data, "index.json"))):
        raise EvaluationError(f"data: no dataset index at {data!r} (the run's data.train); pass --data DIR")
    index = load_index(data)
    cache_dir = cache_dir or default_cache_dir(run_dir)
    inception_weights = inception_weights or _config_value(cfg, "inception_weights")
    n_given = n
    n = int(n or _config_value(cfg, "n") or DEFAULT_N)
    stacked = is_stacked(index)
    if "stacked" in names and not stacked:
        raise EvaluationError(f"--metrics stacked: {data} is not a Stacked-MNIST dataset "
                              f"(source {index.meta.get('source', 'unknown')!r}); write one with "
                              "`ganforge data make-shards --source stacked_mnist`")
    counts_modes = "stacked" in names or ("modes" in names and (stacked or index.kind == "points"))
    if counts_modes and stacked and features == "auto":
        features = "stacked"  # the digits of each channel are what a mode is made of
    elif counts_modes and stacked and features != "stacked":
        raise EvaluationError(f"--metrics stacked/modes on Stacked MNIST read each channel with the MNIST "
                              f"classifier (--features stacked or auto), not --features {features}")

    def build() -> nn.Module:
        return build_extractor(index, features, inception_weights, cache_dir, log)

    # Rank 0 may have to train and cache the classifier; the others then load it from the cache.
    extractor = on_main_first(build, env) if env.world_size > 1 else None
    if extractor is None:
        extractor = build()
    extractor = extractor.to(env.device)
    if index.kind == "points" and "classes" in names:
        raise EvaluationError("--metrics classes: needs labelled images; this dataset holds 2-D points")
    if index.kind != "points" and {"classes", "modes"} & set(names) and not hasattr(extractor, "classify"):
        raise EvaluationError(f"--metrics classes/modes on images need the dataset classifier "
                              f"(--features digits), not {extractor.key}")

    # Metrics on n samples, and mode counts on the protocol's own sample count.
    per_n = [m for m in names if not (counts_modes and m in ("modes", "stacked"))]
    mode_n = (MODE_POINTS if index.kind == "points" else int(n_given or PROTOCOL_SAMPLES)) if counts_modes else 0
    n_gen = max(n if per_n else 0, mode_n)
    if n_gen < max(PR_K + 1, 2):
        raise EvaluationError(f"--n: need at least {PR_K + 1} samples, got {n}")
    fake = generated_features(g, extractor, n_gen, cfg.model.z_dim, seed, env,
                              getattr(cfg.model, "num_classes", 0) or 0, progress=progress)

    def compute() -> dict[str, Any]:
        result = _compute(names, fake[:n], fake[:mode_n], index, extractor, n, cache_dir, env.device, log, progress)
        result |= info | {"n": min(n, n_gen) if per_n else n_gen, "features": extractor.key,
                          "world_size": env.world_size}
        if hasattr(extractor, "accuracy"):
            result["classifier_accuracy"] = round(extractor.accuracy, 4)
        return result

    return on_main_first(compute, env, share=True)


def as_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The measured numbers of an `evaluate` result as eval/<name> (counts and the step left out)."""
    return {f"eval/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))
            and not isinstance(v, bool) and k not in ("n", "n_real", "world_size", "step")}


def on_main_first(fn, env: DistEnv, share: bool = False) -> Any:
    """Run `fn` on rank 0 while the others wait; its error (or, with `share`, its result) reaches every rank.

    Without this, a rank-0 failure (a missing weights file, bad data) would leave the other
    ranks blocked in the next collective.
    """
    value, error = None, None
    if env.rank == 0:
        try:
            value = fn()
        except Exception as e:
            error = e
    if env.world_size > 1:
        box = [(value if share else None, None if error is None else f"{error}")]
        dist.broadcast_object_list(box, src=0)
        if env.rank != 0:
            value, message = box[0]
            if message is not None:
                raise EvaluationError(f"rank 0 failed: {message}")
    if error is not None:
        raise error
    return value


def _config_value(cfg: Any, key: str) -> Any:
    """`cfg.eval.<key>` when the config has an eval section, else None."""
    section = getattr(cfg, "eval", None)
    return getattr(section, key, None) or None


def _compute(names: list[str], fake: torch.Tensor, mode_fake: torch.Tensor, index: Any, extractor: nn.Module,
             n: int, cache_dir: str, device: torch.device, log, progress: Progress = silent) -> dict[str, Any]:
    """Rank 0's part: real features (cached) and the requested metrics.

    `fake` holds the n samples' features, `mode_fake` those of the samples that mode counting uses.
    """
    out: dict[str, Any] = {}
    if any(m in names for m in ("fid", "kid", "pr")):
        from trainer.evaluation.real_stats import real_features

        real = real_features(index, extractor, n, cache_dir, device, log, progress=progress)
        out["n_real"] = len(real)
        if "fid" in names:
            from trainer.evaluation.fid import fid

            out["fid"] = fid(real, fake)
        if "kid" in names:
            from trainer.evaluation.kid import kid

            out["kid"], out["kid_std"] = kid(real, fake)
        if "pr" in names:
            from trainer.evaluation.precision_recall import precision_recall

            out["precision"], out["recall"] = precision_recall(real, fake, PR_K)
    stacked = is_stacked(index)
    if "classes" in names or ("modes" in names and index.kind != "points" and not stacked):
        from trainer.evaluation.class_coverage import class_coverage

        logits = extractor.classify(fake.to(device)).cpu()
        cov = class_coverage(logits, logits.shape[1])
        out |= cov
        if "modes" in names and not stacked:  # on labelled images a mode is a class
            out |= {"modes_covered": cov["classes_covered"], "modes_total": cov["classes_total"],
                    "high_quality": cov["class_confident"]}
    if stacked and ("modes" in names or "stacked" in names):
        out |= stacked_mode_metrics(extractor.channel_logits(mode_fake.to(device)).cpu())
    if "modes" in names and index.kind == "points":
        from trainer.evaluation.modes import mode_metrics

        mixture = index.meta.get("mixture")
        if not mixture:
            raise EvaluationError(f"{index.root}: points dataset without meta.mixture; cannot count modes")
        out |= mode_metrics(mode_fake.numpy(), mixture)
    return out
