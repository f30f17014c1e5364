"""Kernel Inception Distance: the unbiased MMD² with a cubic kernel, averaged over random subsets."""

from __future__ import annotations

import warnings

import torch

from trainer.evaluation.fid import Precomputed


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of KID over `subsets` draws of min(subset_size, N) samples; fixed by `seed`."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = KernelInceptionDistance(feature=Precomputed(real.shape[1]), subsets=subsets,
                                         subset_size=size, sync_on_compute=False)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    # torchmetrics draws the subsets from the global RNG: fork it so the result is a function of seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
