"""Fréchet distance between Gaussian fits of two feature sets (FID), via torchmetrics."""

from __future__ import annotations

import torch
from torch import nn


class Precomputed(nn.Module):
    """torchmetrics' "custom feature module" for features extracted (and gathered) beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between feature sets (N x d each, N >= 2); covariances and the matrix root in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    # The features are already gathered on this rank: no second sync across ranks in compute().
    metric = FrechetInceptionDistance(feature=Precomputed(real.shape[1]), sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())
