"""trainer.grid_sample: the same sampling as F.grid_sample, with a second derivative in the image."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.grid_sample import grid_sample


def warp(padding: str, grid_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    theta = torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3) + 0.2 * torch.randn(2, 2, 3, dtype=torch.float64)
    grid = F.affine_grid(theta, [2, 3, 6, 5], align_corners=False)
    return x, grid.requires_grad_(grid_grad)


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_sampling_equals_torch_and_its_first_and_second_derivatives_check(padding):
    x, grid = warp(padding)
    assert torch.equal(grid_sample(x, grid, padding), F.grid_sample(x, grid, padding_mode=padding, align_corners=False))
    assert torch.autograd.gradcheck(lambda x: grid_sample(x, grid, padding), (x,))
    assert torch.autograd.gradgradcheck(lambda x: grid_sample(x, grid, padding), (x,))
    x, grid = warp(padding, grid_grad=True)
    assert torch.autograd.gradcheck(lambda x, g: grid_sample(x, g, padding), (x, grid))


def test_a_penalty_on_the_input_gradient_reaches_the_weights_behind_the_sampling():
    x, grid = warp("reflection")
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out = (grid_sample(x, grid, "reflection") * w.view(1, 3, 1, 1)).square().sum()
    (gx,) = torch.autograd.grad(out, x, create_graph=True)
    (gw,) = torch.autograd.grad(gx.square().sum(), w)
    ref_out = (F.grid_sample(x, grid, padding_mode="reflection", align_corners=False) * w.view(1, 3, 1, 1)).square().sum()
    (ref_gx,) = torch.autograd.grad(ref_out, x, create_graph=True)
    torch.testing.assert_close(gx, ref_gx)
    # d/dw of ||grad_x||^2 by finite differences: what R1 needs from the sampling
    eps, e = 1e-6, torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        e.zero_()[i] = eps
        f = [torch.autograd.grad((F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
                                  * (w + s * e).view(1, 3, 1, 1)).square().sum(), x)[0].square().sum() for s in (1, -1)]
        assert float(gw[i]) == pytest.approx(float(f[0] - f[1]) / (2 * eps), rel=1e-5)


def test_a_grid_that_needs_grad_is_refused_under_double_backward():
    x, grid = warp("zeros", grid_grad=True)
    (gx,) = torch.autograd.grad(grid_sample(x, grid).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="grid that requires grad"):
        gx.square().sum().backward()
