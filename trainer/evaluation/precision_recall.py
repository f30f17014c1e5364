"""Improved precision and recall (Kynkäänniemi et al. 2019) on k-NN feature manifolds.

Each sample of a set owns a ball reaching its k-th nearest neighbour in that set; the union of
the balls estimates the set's manifold. Precision is the fraction of generated samples inside
the real manifold; recall the fraction of real samples inside the generated one.
"""

from __future__ import annotations

import torch


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    radii = []
    for i in range(0, len(features), chunk):
        d = torch.cdist(features[i:i + chunk], features)
        # the smallest distance is the row to itself (0), so the k-th neighbour is the (k+1)-th smallest
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def coverage_of(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of `queries` inside at least one ball (centre in `manifold`, radius in `radii`)."""
    inside = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i:i + chunk], manifold)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """(precision, recall) of `fake` against `real` features (N x d each, N > k)."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(fake)} generated")
    real, fake = real.double(), fake.double()
    precision = coverage_of(real, knn_radii(real, k), fake)
    recall = coverage_of(fake, knn_radii(fake, k), real)
    return precision, recall
