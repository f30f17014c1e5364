"""Stacked-MNIST mode coverage, with the PacGAN protocol.

A Stacked-MNIST image holds one MNIST digit in each of its R, G and B channels; its mode is the
digit triple, 1,000 in all. An MNIST classifier reads each channel of a generated image; a mode
is covered when at least one sample is read as it, and the histogram of modes is compared with
the uniform one by KL divergence (PacGAN, Lin et al. 2018, Table 2; its code counts 26,000
generated samples).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from data_pipeline.index import ShardIndex
from data_pipeline.sources import STACKED_CHANNELS, STACKED_MODES, mnist_digits
from trainer.evaluation.class_coverage import kl_to_uniform
from trainer.evaluation.digits_classifier import FEATURES, ClassifierFeatures, cached_classifier
from trainer.evaluation.errors import EvaluationError
from trainer.evaluation.real_data import from_eight_bit

PROTOCOL_SAMPLES = 26_000  # generated samples counted when no --n is given


class StackedDigitsFeatures(nn.Module):
    """One MNIST classifier applied to every channel: features are the channels' 128-d features side by side."""

    def __init__(self, digits: ClassifierFeatures, channels: int = STACKED_CHANNELS):
        super().__init__()
        self.digits, self.channels = digits, channels
        self.num_features = channels * FEATURES
        self.key = f"stacked-{digits.key}"
        self.accuracy = digits.accuracy  # held-out accuracy on single MNIST digits

    def train(self, mode: bool = True) -> StackedDigitsFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, c, h, w = images.shape
        if c != self.channels:
            raise EvaluationError(f"stacked digits: images have {c} channels, expected {self.channels}")
        return self.digits(images.reshape(n * c, 1, h, w)).reshape(n, c * FEATURES)

    @torch.no_grad()
    def channel_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, channels, 10) digit logits of each channel."""
        n = len(features)
        return self.digits.classify(features.reshape(n * self.channels, FEATURES)).reshape(n, self.channels, -1)

    @torch.no_grad()
    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(N, 1000) log-probabilities of the modes 100*r + 10*g + b, the channels read independently."""
        per_channel = self.channel_logits(features).float().log_softmax(dim=2)
        joint = per_channel[:, 0]
        for c in range(1, self.channels):
            joint = (joint[:, :, None] + per_channel[:, c, None, :]).flatten(1)
        return joint


def stacked_mode_metrics(channel_logits: torch.Tensor, confident: float = 0.9) -> dict[str, float | int | list]:
    """Mode coverage of samples whose channels were classified as `channel_logits` (N x 3 x 10).

    `modes_covered`: distinct digit triples among the samples; `kl_uniform`: KL(mode histogram ||
    uniform) in nats (0 when balanced, log 1000 = 6.91 when one mode takes all); `high_quality`:
    the fraction of samples whose three digits are each read with probability >= `confident`, and
    `modes_high_quality` the triples that such samples cover.
    """
    probs = channel_logits.float().softmax(dim=2)
    top, digits = probs.max(dim=2)
    modes = (digits * 10 ** torch.arange(digits.shape[1] - 1, -1, -1)).sum(dim=1)
    counts = torch.bincount(modes, minlength=STACKED_MODES).double()
    good = top.min(dim=1).values >= confident
    channel_kl = [kl_to_uniform(torch.bincount(digits[:, c], minlength=10).double()) for c in range(digits.shape[1])]
    return {
        "modes_covered": int((counts > 0).sum()),
        "modes_total": STACKED_MODES,
        "kl_uniform": kl_to_uniform(counts),
        "kl_uniform_max": math.log(STACKED_MODES),
        "high_quality": float(good.double().mean()) if len(top) else 0.0,
        "modes_high_quality": len(torch.unique(modes[good])),
        "channel_kl": [round(kl, 6) for kl in channel_kl],
        "mode_samples": len(modes),
    }


def is_stacked(index: ShardIndex) -> bool:
    """True for a Stacked-MNIST dataset (`make-shards --source stacked_mnist`)."""
    return bool(index.meta.get("stacked"))


def load_stacked_features(index: ShardIndex, cache_dir: str, log=print) -> StackedDigitsFeatures:
    """The per-channel MNIST classifier for a Stacked-MNIST dataset: cached, or trained on the MNIST digits."""
    if not is_stacked(index):
        raise EvaluationError(f"{index.root}: not a Stacked-MNIST dataset (no meta.stacked); "
                              "write one with `ganforge data make-shards --source stacked_mnist`")
    if index.meta.get("digits", "mnist") != "mnist":
        raise EvaluationError(f"{index.root}: stacked digits {index.meta['digits']!r} have no classifier "
                              "(only 'mnist')")
    images, labels = mnist_digits(32)
    fingerprint = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]

    def samples() -> tuple[torch.Tensor, torch.Tensor, int]:
        return from_eight_bit(torch.from_numpy(images).unsqueeze(1)), torch.from_numpy(labels), 10

    return StackedDigitsFeatures(cached_classifier(cache_dir, fingerprint, samples, "MNIST", log))
