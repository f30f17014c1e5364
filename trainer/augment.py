"""Adaptive discriminator augmentation (ADA, Karras et al. 2020): what D sees, and how often.

`augment` applies StyleGAN2-ADA's "bgc" pipeline to a batch, differentiably (so G's gradient
and R1 flow through it): the blit group (x-flip, 90-degree rotations, integer translation), the
geometric group (isotropic scaling, arbitrary rotation, anisotropic scaling, fractional
translation; one affine `grid_sample`, mirrored about the edge pixels) and the colour group
(brightness, contrast, luma flip, hue rotation, saturation; one 4x4 colour matrix). Each
transform happens to a sample with probability p. Its randomness is a tensor of uniforms the
caller draws, one row per sample (`RANDOM_COLUMNS` wide), so a batch is augmented the same way
whatever the number of ranks and after a resume.

`AdaptiveP` adjusts p from the sign of D's outputs on real images: every `interval` steps,
r_t = E[sign(D(real))] over all ranks, and p moves by sign(r_t - target) * images / (kimg * 1000).
The geometric matrices follow the reference's conventions draw for draw: a rotation by theta
(90-degree or arbitrary) is `G_inv @ rotate2d(theta)`, and the image outside its borders is its
mirror image without repeating the edge pixel (the reference's `F.pad(mode='reflect')`).
Differences from the reference: no 2x-oversampling wavelet filter around the geometric warp
(bilinear sampling straight from the image); the mirror repeats indefinitely where the reference
reads zeros beyond one mirrored copy (only under strong zoom-out); p is kept within [0, 1].
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.distributed import DistEnv
from trainer.grid_sample import grid_sample
from trainer.precision import upcast

# Strengths of the reference pipeline (stylegan2-ada-pytorch `training/augment.py` defaults).
XINT_MAX = 0.125  # integer translation, fraction of the image size
SCALE_STD = 0.2  # log2 standard deviation of isotropic scaling
ROTATE_MAX = 1.0  # arbitrary rotation, fraction of a half turn
ANISO_STD = 0.2  # log2 standard deviation of anisotropic scaling
XFRAC_STD = 0.125  # fractional translation, fraction of the image size
BRIGHTNESS_STD = 0.2
CONTRAST_STD = 0.5  # log2
HUE_MAX = 1.0  # fraction of a half turn
SATURATION_STD = 1.0  # log2

# Per sample: for each transform, one coin and its parameters (in this order).
_LAYOUT = (("xflip", 1), ("rotate90", 1), ("xint", 2), ("scale", 1), ("rotate_pre", 1), ("aniso", 1),
           ("rotate_post", 1), ("xfrac", 2), ("brightness", 1), ("contrast", 1), ("lumaflip", 1), ("hue", 1),
           ("saturation", 1))
RANDOM_COLUMNS = sum(1 + k for _, k in _LAYOUT)


class _Draws:
    """Hands out the columns of the per-sample uniforms in layout order."""

    def __init__(self, u: torch.Tensor):
        self.u, self.i = u, 0

    def take(self, k: int) -> torch.Tensor:
        out = self.u[:, self.i:self.i + k]
        self.i += k
        return out


def _normal(u: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6))


def _eye(n: int, batch: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, device=device).repeat(batch, 1, 1)


def _affine(batch: int, device: torch.device, a=1.0, b=0.0, tx=0.0, c=0.0, d=1.0, ty=0.0) -> torch.Tensor:
    """(B, 3, 3) matrices [[a, b, tx], [c, d, ty], [0, 0, 1]]; entries are scalars or (B,) tensors."""
    m = _eye(3, batch, device)
    for (i, j), v in zip(((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)), (a, b, tx, c, d, ty), strict=True):
        m[:, i, j] = v
    return m


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return _affine(len(theta), theta.device, c, -s, 0.0, s, c, 0.0)


def geometric_matrix(u: torch.Tensor, p: float, size: tuple[int, int]) -> torch.Tensor:
    """(B, 3, 3) inverse transforms (output -> input, in [-1, 1] image coordinates) from the blit
    and geometric groups, each applied with probability p, for (H, W) images; reads the first
    columns of `u`."""
    draws = _Draws(u)
    n, dev = len(u), u.device

    def coin(prob: float = p) -> torch.Tensor:
        return draws.take(1)[:, 0] < prob

    inv = _eye(3, n, dev)
    on = coin(); i = torch.floor(draws.take(1)[:, 0] * 2)  # noqa: E702
    inv = inv @ _affine(n, dev, a=1 - 2 * torch.where(on, i, 0.0))  # x-flip
    on = coin(); i = torch.floor(draws.take(1)[:, 0] * 4)  # noqa: E702
    inv = inv @ _rotation(math.pi / 2 * torch.where(on, i, 0.0))  # the reference's rotate2d_inv(-pi/2 i)
    on = coin(); t = (draws.take(2) * 2 - 1) * XINT_MAX  # noqa: E702
    # Whole pixels: a shift of k pixels is 2k / size in [-1, 1] coordinates.
    tx, ty = torch.round(t[:, 0] * size[1]) * 2 / size[1], torch.round(t[:, 1] * size[0]) * 2 / size[0]
    inv = inv @ _affine(n, dev, tx=-torch.where(on, tx, 0.0), ty=-torch.where(on, ty, 0.0))
    on = coin(); s = torch.exp2(_normal(draws.take(1)[:, 0]) * SCALE_STD)  # noqa: E702
    s = torch.where(on, s, 1.0)
    inv = inv @ _affine(n, dev, a=1 / s, d=1 / s)
    p_rot = 1 - math.sqrt(max(0.0, 1 - p))  # two rotations, so that P(any rotation) = p
    on = coin(p_rot); theta = (draws.take(1)[:, 0] * 2 - 1) * math.pi * ROTATE_MAX  # noqa: E702
    inv = inv @ _rotation(torch.where(on, theta, 0.0))  # rotate2d_inv(-theta), as the reference
    on = coin(); s = torch.exp2(_normal(draws.take(1)[:, 0]) * ANISO_STD)  # noqa: E702
    s = torch.where(on, s, 1.0)
    inv = inv @ _affine(n, dev, a=1 / s, d=s)
    on = coin(p_rot); theta = (draws.take(1)[:, 0] * 2 - 1) * math.pi * ROTATE_MAX  # noqa: E702
    inv = inv @ _rotation(torch.where(on, theta, 0.0))
    on = coin(); t = _normal(draws.take(2)) * XFRAC_STD  # noqa: E702
    inv = inv @ _affine(n, dev, tx=-torch.where(on, t[:, 0], 0.0) * 2, ty=-torch.where(on, t[:, 1], 0.0) * 2)
    return inv


def color_matrix(u: torch.Tensor, p: float) -> torch.Tensor:
    """(B, 4, 4) colour transforms (homogeneous RGB) from the colour group; reads the columns
    after the geometric ones."""
    draws = _Draws(u)
    draws.i = sum(1 + k for name, k in _LAYOUT if name not in ("brightness", "contrast", "lumaflip", "hue",
                                                              "saturation"))
    n, dev = len(u), u.device

    def coin() -> torch.Tensor:
        return draws.take(1)[:, 0] < p

    luma = torch.tensor([1.0, 1.0, 1.0, 0.0], device=dev) / math.sqrt(3)
    vv = torch.outer(luma, luma)
    m = _eye(4, n, dev)
    on = coin(); b = torch.where(on, _normal(draws.take(1)[:, 0]) * BRIGHTNESS_STD, 0.0)  # noqa: E702
    shift = _eye(4, n, dev)
    shift[:, :3, 3] = b.unsqueeze(1)
    m = shift @ m
    on = coin(); c = torch.where(on, torch.exp2(_normal(draws.take(1)[:, 0]) * CONTRAST_STD), 1.0)  # noqa: E702
    m = torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], 1)) @ m
    on = coin(); i = torch.where(on, torch.floor(draws.take(1)[:, 0] * 2), 0.0)  # noqa: E702
    m = (_eye(4, n, dev) - 2 * vv * i.reshape(-1, 1, 1)) @ m  # Householder reflection of the luma axis
    on = coin(); theta = torch.where(on, (draws.take(1)[:, 0] * 2 - 1) * math.pi * HUE_MAX, 0.0)  # noqa: E702
    m = _rotate_about(luma[:3], theta) @ m
    on = coin(); s = torch.where(on, torch.exp2(_normal(draws.take(1)[:, 0]) * SATURATION_STD), 1.0)  # noqa: E702
    m = (vv + (torch.eye(4, device=dev) - vv) * s.reshape(-1, 1, 1)) @ m
    return m


def _rotate_about(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """(B, 4, 4) rotations by theta about a unit 3-D axis (Rodrigues), in homogeneous form."""
    x, y, z = axis.tolist()
    k = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], device=theta.device)
    s, c = torch.sin(theta).reshape(-1, 1, 1), torch.cos(theta).reshape(-1, 1, 1)
    r = torch.eye(3, device=theta.device) + s * k + (1 - c) * (k @ k)
    m = _eye(4, len(theta), theta.device)
    m[:, :3, :3] = r
    return m


def augment(images: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] augmented with probability p per transform; `u` holds
    (B, RANDOM_COLUMNS) uniforms in [0, 1). Differentiable in `images`; identity when p = 0."""
    if p <= 0:
        return images
    if u.shape != (len(images), RANDOM_COLUMNS):
        raise ValueError(f"augment needs ({len(images)}, {RANDOM_COLUMNS}) uniforms, got {tuple(u.shape)}")
    with torch.autocast(images.device.type, enabled=False):  # matrices and sampling in fp32 (fp64 in an fp64 run)
        return _augment(upcast(images), upcast(u), p).to(images.dtype)


def _augment(x: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    b, c, h, w = x.shape
    inv = geometric_matrix(u, p, (h, w))
    if not torch.equal(inv, _eye(3, b, x.device)):
        grid = F.affine_grid(inv[:, :2, :].to(x.dtype), [b, c, h, w], align_corners=False)
        grid = torch.stack([mirror(grid[..., 0], w), mirror(grid[..., 1], h)], dim=-1)
        x = grid_sample(x, grid, padding_mode="border")  # twice differentiable: R1 passes through it
    m = color_matrix(u, p).to(x.dtype)
    flat = x.reshape(b, c, h * w)
    if c == 3:
        flat = m[:, :3, :3] @ flat + m[:, :3, 3:]
    elif c == 1:  # grey images: the mean of the RGB rows, applied to equal R = G = B
        m = m[:, :3, :].mean(dim=1, keepdim=True)
        flat = flat * m[:, :, :3].sum(dim=2, keepdim=True) + m[:, :, 3:]
    return flat.reshape(b, c, h, w)


def mirror(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling coordinates (in [-1, 1], align_corners=False) folded back into the image by
    mirroring about the centres of the edge pixels, so the edge pixel is not repeated: ..., 2, 1,
    [0, 1, ..., n-1], n-2, ... (the reference pads with `F.pad(mode='reflect')`; grid_sample's own
    "reflection" mirrors about the outer pixel borders, repeating the edge)."""
    last = max(size - 1, 1)
    px = torch.remainder(((coord + 1) * size - 1) / 2, 2 * last)  # pixel units, one period of the mirror
    px = torch.where(px > last, 2 * last - px, px).clamp(max=size - 1)
    return (2 * px + 1) / size - 1


class AdaptiveP:
    """The augmentation probability and the running E[sign(D(real))] that steers it."""

    def __init__(self, p: float, target: float, interval: int, kimg: float, batch_size: int, adaptive: bool = True):
        self.p, self.target, self.interval, self.kimg = float(p), target, interval, kimg
        self.batch_size, self.adaptive = batch_size, adaptive
        self.signs = torch.zeros(2, dtype=torch.float64)  # (sum of signs, count) on this rank since the last update
        self.rt = 0.0  # the last measured r_t

    def observe(self, real_logits: torch.Tensor) -> None:
        """Count the signs of D's outputs on (augmented) real images of this rank."""
        if self.adaptive:
            x = upcast(real_logits.detach())
            self.signs = self.signs.to(x.device) + torch.stack([x.sign().sum(), x.new_tensor(x.numel())]).double()

    def _global_signs(self, env: DistEnv | None) -> torch.Tensor:
        total = self.signs.clone()
        if env is not None and env.world_size > 1:
            dist.all_reduce(total)
        return total

    def update(self, step: int, env: DistEnv | None = None) -> None:
        """After step `step` (0-based): every `interval` steps, move p towards r_t = target."""
        if not self.adaptive or (step + 1) % self.interval:
            return
        total, count = self._global_signs(env).tolist()
        self.signs = torch.zeros_like(self.signs)
        if count == 0:
            return
        self.rt = total / count
        adjust = math.copysign(1.0, self.rt - self.target) if self.rt != self.target else 0.0
        self.p = min(1.0, max(0.0, self.p + adjust * self.batch_size * self.interval / (self.kimg * 1000)))

    def gather(self, env: DistEnv | None) -> None:
        """Every rank, before a checkpoint: sum the pending sign counts of all ranks (rank 0 saves them)."""
        self.pending = self._global_signs(env)

    def state_dict(self) -> dict[str, Any]:
        pending = getattr(self, "pending", self.signs)
        return {"p": self.p, "rt": self.rt, "signs": pending.cpu()}

    def load_state_dict(self, state: dict[str, Any], env: DistEnv) -> None:
        self.p, self.rt = float(state["p"]), float(state.get("rt", 0.0))
        # The saved counts are every rank's together: rank 0 carries them on, the others start at 0.
        signs = state["signs"].double() if env.rank == 0 else torch.zeros(2, dtype=torch.float64)
        self.signs = signs.to(env.device)
