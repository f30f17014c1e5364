"""Bilinear grid sampling whose input gradient can be differentiated again.

Some PyTorch releases (2.11, the GPU machine's, among them) have no derivative for
`grid_sampler_2d_backward`, so R1 (a gradient penalty on D's input) through ADA's geometric
augmentation fails there as soon as p > 0. Sampling is linear in the
image, so the derivative of its input gradient with respect to the incoming gradient is the
sampling itself: that is the double backward given here. The grid gets first-order gradients
only, and a grid that requires grad is refused under double backward (ADA's grid is built from
random parameters and needs none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}  # ATen's enum values
BILINEAR = 0


def grid_sample(x: torch.Tensor, grid: torch.Tensor, padding_mode: str = "zeros",
                align_corners: bool = False) -> torch.Tensor:
    """`F.grid_sample(x, grid, mode="bilinear", ...)`, twice differentiable in `x`."""
    return _Sample.apply(x, grid, padding_mode, align_corners)


class _Sample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, grid, padding_mode, align_corners):
        ctx.save_for_backward(x, grid)
        ctx.options = (padding_mode, align_corners)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=align_corners)

    @staticmethod
    def backward(ctx, grad_out):
        x, grid = ctx.saved_tensors
        mask = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        grad_x, grad_grid = _SampleBackward.apply(grad_out, x, grid, mask, *ctx.options)
        return grad_x, grad_grid, None, None


class _SampleBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_out, x, grid, mask, padding_mode, align_corners):
        ctx.save_for_backward(grid)
        ctx.options = (padding_mode, align_corners)
        grad_x, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_out, x, grid, BILINEAR, PADDING_MODES[padding_mode], align_corners, list(mask))
        return grad_x, grad_grid

    @staticmethod
    def backward(ctx, grad_grad_x, grad_grad_grid):
        (grid,) = ctx.saved_tensors
        if grid.requires_grad:
            raise RuntimeError("grid_sample: no second-order gradient for a grid that requires grad")
        grad_grad_out = None
        if ctx.needs_input_grad[0] and grad_grad_x is not None:
            grad_grad_out = _Sample.apply(grad_grad_x, grid, *ctx.options)  # linear in the image
        return grad_grad_out, None, None, None, None, None
