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
    nonzero = hist[hist > 0]
    kl = float((nonzero * (nonzero * num_classes).log()).sum())
    covered = torch.unique(pred[top >= confident])
    return {
        "class_kl": kl,
        "class_kl_max": math.log(num_classes),
        "classes_covered": int(len(covered)),
        "classes_total": int(num_classes),
        "class_confident": float((top >= confident).double().mean()) if len(top) else 0.0,
        "class_histogram": [round(float(h), 6) for h in hist],
    }
