"""PacGAN packing (Lin et al. 2018): D judges `k` samples jointly, concatenated along dim 1.

Pack j of an n-row batch holds rows j, j + n/k, ..., j + (k-1)n/k. Strided rather than
consecutive rows so that packs are a function of global sample positions, not of the world
size: rank r of W holds the positions r, r + W, ... of each (micro-)batch of N = nW samples
(`data_pipeline.planner`, and `global_draw` for latents, labels and penalty draws), so row
i + m*n/k of rank r is global position (r + iW) + m*N/k. Every pack thus holds the positions
q, q + N/k, ..., q + (k-1)N/k of the global (micro-)batch, on whichever rank holds q, for
any W that divides N/k; no sample crosses ranks and a resume on another world size sees the
same packs.
"""

from __future__ import annotations

import torch


def pack(x: torch.Tensor | None, k: int) -> torch.Tensor | None:
    """(n, C, ...) -> (n/k, kC, ...): images along channels, points along features; labels (n,)
    -> (n/k, k). k == 1 (or None) returns `x` itself."""
    if x is None or k == 1:
        return x
    if x.shape[0] % k:
        raise ValueError(f"a batch of {x.shape[0]} samples does not split into packs of {k}")
    chunks = x.split(x.shape[0] // k)
    return torch.stack(chunks, dim=1) if x.dim() == 1 else torch.cat(chunks, dim=1)

