"""Class coverage of generated images under the dataset's classifier: histogram and KL to uniform."""

from __future__ import annotations

import math

import torch


def class_coverage(logits: torch.Tensor, num_classes: int, confident: float = 0.9) -> dict[str, float | int | list]:
    """Predicted-class histogram of generated samples and how far it is from uniform.

    `class_kl` is KL(histogram || uniform) in nats: 0 when every class is generated equally
    often, log(num_classes) when one class takes all. A class is covered when at least one
    sample is predicted as it with probability >= `confident`.
    """
    probs = logits.float().softmax(dim=1)
    top, pred = probs.max(dim=1)
    hist = torch.bincount(pred, minlength=num_classes).double() / max(len(pred), 1)
    covered = torch.unique(pred[top >= confident])
    return {
        "class_kl": kl_to_uniform(hist),
        "class_kl_max": math.log(num_classes),
        "classes_covered": int(len(covered)),
        "classes_total": int(num_classes),
        "class_confident": float((top >= confident).double().mean()) if len(top) else 0.0,
        "class_histogram": [round(float(h), 6) for h in hist],
    }


def kl_to_uniform(counts: torch.Tensor) -> float:
    """KL(p || uniform) in nats of the histogram `counts` (any scale): 0 when flat, log K when one bin holds all."""
    p = counts.double() / max(float(counts.sum()), 1e-300)
    p = p[p > 0]
    return float((p * (p * len(counts)).log()).sum())
