"""Upscaling images too large for one forward pass, tile by tile and without seams.

Each tile of LR pixels is run with `overlap` pixels of context on every side (clipped at the
image border) and only its centre is kept, as in Real-ESRGAN's `tile_process`. When the
network's receptive field (in LR pixels) is no wider than the overlap, every kept output pixel
sees exactly the input it would see in a whole-image pass, so the result equals the untiled one.
"""

from __future__ import annotations

import torch
from torch import nn


def upscale_tiled(net: nn.Module, lr: torch.Tensor, scale: int, tile: int = 0, overlap: int = 8,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """Run `net` ((N, C, h, w) in [-1, 1] -> (N, C, h*scale, w*scale)) on `lr`, whole or in tiles.

    `lr` is (N, C, H, W) or (C, H, W); the output has the same layout and lives on `lr`'s device,
    so only one tile at a time occupies `device`. tile == 0 means one pass over the whole image.
    The caller chooses the net's mode (eval for inference).
    """
    if tile < 0 or overlap < 0:
        raise ValueError(f"tile ({tile}) and overlap ({overlap}) must not be negative")
    single = lr.dim() == 3
    x = lr[None] if single else lr
    n, c, h, w = x.shape
    with torch.no_grad():
        if tile == 0:
            out = net(x.to(device)).to(lr.device)
        else:
            out = torch.empty(n, c, h * scale, w * scale, dtype=x.dtype, device=lr.device)
            for y0 in range(0, h, tile):
                for x0 in range(0, w, tile):
                    y1, x1 = min(y0 + tile, h), min(x0 + tile, w)
                    ya, xa = max(y0 - overlap, 0), max(x0 - overlap, 0)
                    yb, xb = min(y1 + overlap, h), min(x1 + overlap, w)
                    result = net(x[:, :, ya:yb, xa:xb].to(device)).to(lr.device)
                    top, left = (y0 - ya) * scale, (x0 - xa) * scale
                    out[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                        result[:, :, top:top + (y1 - y0) * scale, left:left + (x1 - x0) * scale]
    if out.shape[-2:] != (h * scale, w * scale):
        raise ValueError(f"the network gave {tuple(out.shape[-2:])} for a {h}x{w} input at scale {scale}")
    return out[0] if single else out
