"""Real-data features, cached per (dataset index fingerprint, extractor, sample count)."""

from __future__ import annotations

import os

import torch
from torch import nn

from data_pipeline.index import ShardIndex
from data_pipeline.progress import Progress, silent
from trainer.evaluation.features import extract
from trainer.evaluation.real_data import read_samples, real_subset


def cache_file(cache_dir: str, index: ShardIndex, extractor: nn.Module, n: int) -> str:
    return os.path.join(cache_dir, f"real_{index.fingerprint()}_{extractor.key}_{n}.pt")


def real_features(index: ShardIndex, extractor: nn.Module, n: int, cache_dir: str,
                  device: torch.device | str = "cpu", log=print, chunk: int = 1000,
                  progress: Progress = silent) -> torch.Tensor:
    """Features (float64, CPU) of min(n, dataset size) real samples; read from / written to `cache_dir`.

    The whole feature matrix is kept (not only mean and covariance) because KID and
    precision/recall need the samples themselves.
    """
    samples = real_subset(index, n)
    path = cache_file(cache_dir, index, extractor, len(samples))
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["fingerprint"] == index.fingerprint() and saved["features"].shape[0] == len(samples):
                return saved["features"]
        except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, not fatal
            log(f"ganforge eval: ignoring unreadable cache {path} ({type(e).__name__})")
    # In chunks: a large image dataset does not fit in memory as float tensors at once.
    parts = []
    with progress(len(samples), "real features", "images") as advance:
        for i in range(0, len(samples), chunk):
            parts.append(extract(extractor, read_samples(index, samples[i:i + chunk])[0], device))
            advance(len(parts[-1]))
    feats = torch.cat(parts)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"features": feats, "fingerprint": index.fingerprint(), "extractor": extractor.key,
                "samples": torch.from_numpy(samples)}, tmp)
    os.replace(tmp, path)
    return feats
