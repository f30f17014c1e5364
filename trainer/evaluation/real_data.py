"""Real samples of a run's dataset, read straight from the shards in a fixed order."""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.index import ShardIndex
from data_pipeline.loader import decode_samples
from trainer.evaluation.errors import EvaluationError

REAL_SUBSET_SEED = 20190411  # fixes which real samples are compared when the dataset is larger than n


def real_subset(index: ShardIndex, n: int) -> np.ndarray:
    """Global sample numbers of the first `n` samples in a fixed permutation (all when n >= the dataset)."""
    order = np.random.default_rng(REAL_SUBSET_SEED).permutation(index.num_samples)
    return np.sort(order[:min(n, index.num_samples)])


def from_eight_bit(images: torch.Tensor) -> torch.Tensor:
    """8-bit images (uint8, v in 0..255) as the extractors take them: float32 v / 127.5 - 1.

    The one way into a feature extractor for images: real ones from the shards or a folder, and
    generated ones after `trainer.sampling.eight_bit`, so equal bytes give equal features.
    Always float32 arithmetic (unlike `trainer.data.to_unit_range`, which follows the default
    dtype): cached real features must not depend on whether an fp64 run or the CLI made them."""
    return images.float() / 127.5 - 1.0


def has_labels(index: ShardIndex) -> bool:
    """True when the samples carry a class label (a `cls` member)."""
    return "cls" in index.locate(0)[1].members


def read_samples(index: ShardIndex, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data, labels) for the given sample numbers.

    Images come back as float in [-1, 1] (N x C x H x W), points as float (N x D); labels are
    int64, or None when the dataset has none.
    """
    key = {"image": "image", "points": "points"}.get(index.kind)
    if key is None:
        raise EvaluationError(f"{index.root}: cannot evaluate a dataset of kind {index.kind!r} "
                              "(image or points only)")
    items = decode_samples(index, samples)
    data = torch.stack([it[key] for it in items])
    data = from_eight_bit(data) if key == "image" else data.float()
    labels = torch.stack([it["label"] for it in items]) if items and "label" in items[0] else None
    return data, labels
