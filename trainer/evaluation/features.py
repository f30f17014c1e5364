"""Choosing the feature extractor: Inception-v3, the dataset's own classifier, a per-channel MNIST
classifier for Stacked MNIST, or the raw 2-D points.

Every extractor is an nn.Module mapping a batch of generator-range samples to (N, d) features,
with `num_features` and a `key` that names it (and its weights) in cache file names.
"""

from __future__ import annotations

import torch
from torch import nn

from data_pipeline.index import ShardIndex
from trainer.evaluation.errors import EvaluationError
from trainer.evaluation.real_data import has_labels

EXTRACTORS = ("auto", "inception", "digits", "stacked", "points")


class PointFeatures(nn.Module):
    """2-D points are their own features: FID/KID/PR compare the point clouds directly."""

    key = "points"

    def __init__(self, dims: int = 2):
        super().__init__()
        self.num_features = dims

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return points.float().reshape(len(points), -1)


def build_extractor(index: ShardIndex, kind: str = "auto", inception_weights: str | None = None,
                    cache_dir: str = ".", log=print) -> nn.Module:
    """The extractor for this dataset.

    `auto` picks Inception when weights are given, the per-channel MNIST classifier for Stacked
    MNIST, the dataset's own classifier for other labelled images, and the points themselves
    for 2-D data.
    """
    if kind not in EXTRACTORS:
        raise EvaluationError(f"--features: unknown extractor {kind!r} (choose {', '.join(EXTRACTORS)})")
    if kind == "auto":
        if index.kind == "points":
            kind = "points"
        elif inception_weights:
            kind = "inception"
        elif index.meta.get("stacked"):
            kind = "stacked"
        elif index.kind == "image" and has_labels(index):
            kind = "digits"
        else:
            raise EvaluationError(f"{index.root}: unlabelled images need Inception features: set "
                                  "eval.inception_weights=PATH (--inception-weights PATH)")
    if kind == "points":
        if index.kind != "points":
            raise EvaluationError(f"--features points: {index.root} holds {index.kind} data, not points")
        return PointFeatures(int(index.meta.get("dims", 2)))
    if index.kind != "image":
        raise EvaluationError(f"--features {kind}: {index.root} holds {index.kind} data, not images")
    if kind == "inception":
        from trainer.evaluation.inception import load_inception

        if not inception_weights:
            raise EvaluationError("--features inception needs eval.inception_weights=PATH (--inception-weights PATH)")
        return load_inception(inception_weights)
    if kind == "stacked":
        from trainer.evaluation.stacked_mnist import load_stacked_features

        return load_stacked_features(index, cache_dir, log)
    from trainer.evaluation.digits_classifier import load_or_train

    return load_or_train(index, cache_dir, log)


@torch.no_grad()
def extract(extractor: nn.Module, samples: torch.Tensor, device: torch.device | str = "cpu",
            batch: int = 250) -> torch.Tensor:
    """Features of `samples` in batches, as float64 on CPU (FID's covariances want the precision)."""
    out = [extractor(samples[i:i + batch].to(device)).double().cpu() for i in range(0, len(samples), batch)]
    return torch.cat(out) if out else torch.zeros(0, extractor.num_features, dtype=torch.float64)
