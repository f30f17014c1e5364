"""Latents, generation and image grids shared by the loop and `ganforge sample`."""

from __future__ import annotations

import os

import torch
from torch import nn

from data_pipeline.progress import Advance


def latents(seed: int, n: int, z_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n latent vectors fixed by `seed` (drawn on CPU, so identical on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, z_dim, generator=g).to(device)


@torch.no_grad()
def run_in_chunks(net: nn.Module, *inputs: torch.Tensor | None, batch: int = 256,
                  device: torch.device | str | None = None, advance: Advance = lambda n: None) -> torch.Tensor:
    """net(*inputs) in eval mode, `batch` rows at a time (None inputs pass through), as float32 on CPU.

    Floating-point inputs go in the default dtype (float64 in an fp64 run, whose networks are float64).
    `advance(rows)` is called after each chunk. A network compiled for training (train.compile) runs
    eagerly here: its eval-mode, no-grad calls at another batch size would otherwise compile it
    again, stalling the loop at each sample step and using up dynamo's recompile limit."""
    def part(x: torch.Tensor, i: int) -> torch.Tensor:
        return x[i:i + batch].to(device or x.device, torch.get_default_dtype() if x.is_floating_point() else x.dtype)

    def run(i: int) -> torch.Tensor:
        out = net(*(None if x is None else part(x, i) for x in inputs)).float().cpu()
        advance(len(out))
        return out

    was_training = net.training
    net.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            return torch.cat([run(i) for i in range(0, len(inputs[0]), batch)])
    finally:
        net.train(was_training)


HELD_OUT_PICTURED = 8  # held-out examples pictured in each sample grid of the image-to-image families


def spread(n: int, k: int = HELD_OUT_PICTURED) -> list[int]:
    """k of n indices spread evenly from the first to the last (held-out splits are ordered by
    source picture, so these show different pictures)."""
    return torch.linspace(0, n - 1, min(k, n)).round().long().tolist()


def eight_bit(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8, the way StyleGAN2-ADA and clean-fid store them: x * 127.5 + 128,
    clamped to 0..255, truncated."""
    return (images * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def generate(g: nn.Module, z: torch.Tensor, labels: torch.Tensor | None = None, batch: int = 256,
             advance: Advance = lambda n: None) -> torch.Tensor:
    """G(z[, labels]) in eval mode, in chunks, as float32 on CPU."""
    return run_in_chunks(g, z, labels, batch=batch, advance=advance)


def class_cycle(n: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """Labels 0, 1, ..., num_classes-1, 0, 1, ... for conditional models (None otherwise)."""
    return torch.arange(n, device=device) % num_classes if num_classes else None


def save_samples(samples: torch.Tensor, path: str, centres=None) -> str:
    """Images as a grid, 2-D points as a scatter plot (over the mode centres, if known)."""
    if samples.dim() == 4:
        return save_grid(samples, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    pts = samples.numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, label="generated")
    if centres is not None:
        c = torch.as_tensor(centres).numpy()
        ax.scatter(c[:, 0], c[:, 1], s=30, marker="x", color="red", label="modes")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_grid(images: torch.Tensor, path: str, nrow: int | None = None) -> str:
    """Save images in [-1, 1] as one PNG grid (atomically)."""
    from torchvision.utils import save_image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    tmp = path + ".tmp.png"
    save_image(images.clamp(-1, 1) * 0.5 + 0.5, tmp, nrow=nrow, padding=2, pad_value=1.0)
    os.replace(tmp, path)
    return path


class ServedGenerator(nn.Module):
    """G with one input tensor, as model servers pass it: latents (N, z_dim), or for a conditional
    G latents with the class label as one more column (N, z_dim + 1); a translation G takes images."""

    def __init__(self, g: nn.Module, conditional: bool):
        super().__init__()
        self.g, self.conditional = g, conditional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conditional:
            return self.g(x[:, :-1], x[:, -1].long())
        return self.g(x)
