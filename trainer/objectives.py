"""GAN objectives on raw D outputs (logits), safe under autocast."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.precision import upcast


def d_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Discriminator (critic) loss from its outputs on real and generated samples."""
    real, fake = upcast(real), upcast(fake)
    if kind == "bce":  # -log sigmoid(real) - log(1 - sigmoid(fake))
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    if kind in ("wgan", "wgan_gp"):
        return fake.mean() - real.mean()
    if kind == "lsgan":
        return 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake**2).mean()
    raise ValueError(f"unknown loss.type {kind!r}")


def g_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """Generator loss from D's outputs on generated samples (non-saturating for bce)."""
    fake = upcast(fake)
    if kind == "bce":
        return F.softplus(-fake).mean()
    if kind in ("hinge", "wgan", "wgan_gp"):
        return -fake.mean()
    if kind == "lsgan":
        return 0.5 * ((fake - 1) ** 2).mean()
    raise ValueError(f"unknown loss.type {kind!r}")


def gradient_penalty(d: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP: E[(||grad D(x_hat)|| - 1)^2] at x_hat = eps*real + (1-eps)*fake."""
    shape = (-1,) + (1,) * (real.dim() - 1)
    x_hat = (eps.view(shape) * real.detach() + (1 - eps.view(shape)) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(upcast(d(x_hat, labels)).sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(2, dim=1) - 1) ** 2).mean()


def r1_penalty(real_out: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): E||grad_x D(x)||^2 on real data; `real` must require grad."""
    (grad,) = torch.autograd.grad(upcast(real_out).sum(), real, create_graph=True)
    return grad.flatten(1).pow(2).sum(dim=1).mean()
