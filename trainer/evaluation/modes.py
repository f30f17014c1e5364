"""Mode coverage on 2-D Gaussian mixtures, with the PacGAN protocol.

A sample is high quality when it lies within 3 standard deviations of its nearest mode
centre; a mode is covered when it is the nearest centre of at least one high-quality sample.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.sources import mixture_centres


def mode_metrics(points: np.ndarray, mixture: str) -> dict[str, float]:
    """{"modes_covered", "modes_total", "high_quality"} for generated `points` (N x 2)."""
    centres, std = mixture_centres(mixture)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    dist = np.linalg.norm(points[:, None, :] - centres[None, :, :], axis=2)
    nearest = dist.argmin(axis=1)
    good = dist[np.arange(len(points)), nearest] <= 3 * std
    return {
        "modes_covered": int(len(np.unique(nearest[good]))),
        "modes_total": int(len(centres)),
        "high_quality": float(good.mean()) if len(points) else 0.0,
    }
