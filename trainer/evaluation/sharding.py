"""Generated-sample features split across ranks by global sample index, gathered in global order.

Sample i always gets latent row i of `latents(seed, n, z_dim)` (and label i mod num_classes for a
class-conditional generator), and samples are generated in fixed chunks of global indices that
are dealt round-robin to the ranks. Each sample is therefore produced by the same computation
whatever the world size, and the gathered features are the same set in the same order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.progress import Advance, Progress, silent
from trainer.distributed import DistEnv
from trainer.evaluation.real_data import from_eight_bit
from trainer.sampling import eight_bit, latents


def rank_chunks(n: int, chunk: int, world_size: int, rank: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of global sample indices that `rank` generates."""
    starts = range(0, n, chunk)
    return [(s, min(s + chunk, n)) for i, s in enumerate(starts) if i % world_size == rank]


def as_stored(samples: torch.Tensor) -> torch.Tensor:
    """Generated images as the real ones reach the extractor: clamped and truncated to 8 bits
    (`eight_bit`, as StyleGAN2-ADA and clean-fid store them), then read back exactly as real
    images are (`from_eight_bit`), so FIDs are comparable with published ones. 2-D points pass
    unchanged."""
    if samples.dim() != 4:
        return samples
    return from_eight_bit(eight_bit(samples))


@torch.no_grad()
def local_features(g: nn.Module, extractor: nn.Module, z: torch.Tensor, labels: torch.Tensor | None,
                   chunks: list[tuple[int, int]], device: torch.device,
                   advance: Advance = lambda n: None) -> torch.Tensor:
    """Features (float64) of this rank's chunks, concatenated in chunk order."""
    out = []
    for start, stop in chunks:
        args = (z[start:stop].to(device),)
        if labels is not None:
            args += (labels[start:stop].to(device),)
        out.append(extractor(as_stored(g(*args).float())).double())
        advance(stop - start)
    return torch.cat(out) if out else torch.zeros(0, extractor.num_features, dtype=torch.float64, device=device)


def gather_in_order(local: torch.Tensor, n: int, chunk: int, env: DistEnv) -> torch.Tensor:
    """Every rank's chunk features, reassembled into global sample order (on CPU, on every rank)."""
    if env.world_size == 1:
        return local.cpu()
    most = max(sum(b - a for a, b in rank_chunks(n, chunk, env.world_size, r)) for r in range(env.world_size))
    padded = torch.zeros(most, local.shape[1], dtype=local.dtype, device=local.device)
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    out = torch.empty(n, local.shape[1], dtype=local.dtype)
    for r, part in enumerate(parts):
        offset = 0
        for a, b in rank_chunks(n, chunk, env.world_size, r):
            out[a:b] = part[offset:offset + b - a].cpu()
            offset += b - a
    return out


def generated_features(g: nn.Module, extractor: nn.Module, n: int, z_dim: int, seed: int, env: DistEnv,
                       num_classes: int = 0, chunk: int = 250, progress: Progress = silent) -> torch.Tensor:
    """Features of generated samples 0..n-1 (N x d, float64, CPU), computed across all ranks.

    `progress` shows this rank's share (rank 0's is representative: chunks are dealt evenly)."""
    z = latents(seed, n, z_dim)
    labels = torch.arange(n) % num_classes if num_classes > 0 else None
    chunks = rank_chunks(n, chunk, env.world_size, env.rank)
    was_training = g.training
    g.eval()
    try:  # a network compiled for training runs eagerly here, as in sample grids (see run_in_chunks)
        with progress(sum(b - a for a, b in chunks), "generate + features", "images") as advance, \
                torch.compiler.set_stance("force_eager"):
            local = local_features(g, extractor, z, labels, chunks, env.device, advance)
    finally:
        g.train(was_training)
    return gather_in_order(local, n, chunk, env)
