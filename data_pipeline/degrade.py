"""Super-resolution training pairs made on the fly from a high-resolution uint8 image.

A pair is (random HR crop, its degraded LR version). The LR path follows Real-ESRGAN's first
order model: optional Gaussian blur -> antialiased bicubic downsampling -> optional Gaussian
noise -> rounding to uint8 -> optional JPEG re-encoding. Every random draw comes from the
`np.random.Generator` the caller passes, so a pair is a pure function of (image, rng state) and
a resumed or re-sharded run sees exactly the same pairs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.errors import DataError

SCALES = (2, 4)
KERNEL = 21  # blur kernel side, as in Real-ESRGAN


def _check_scale(scale: int) -> None:
    if scale not in SCALES:
        raise DataError(f"super-resolution scale {scale} is not supported (choose 2 or 4)")


def _batched(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) or (N, C, H, W) as float32 (N, C, H, W): F.interpolate and conv2d want a batch."""
    if image.dim() not in (3, 4):
        raise DataError(f"expected a (C, H, W) or (N, C, H, W) image, got shape {tuple(image.shape)}")
    x = image.float()
    return x if x.dim() == 4 else x[None]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 255).round().to(torch.uint8)


def bicubic_down(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic downsampling of a uint8 (C, H, W) or (N, C, H, W) image, as uint8.

    The deterministic part of every degradation: held-out LR inputs and the bicubic baseline use it.
    """
    _check_scale(scale)
    h, w = hr.shape[-2:]
    if h % scale or w % scale:
        raise DataError(f"image of {w}x{h} (WxH) cannot be downsampled by {scale}: both sides must divide by it")
    x = F.interpolate(_batched(hr), size=(h // scale, w // scale), mode="bicubic", antialias=True,
                      align_corners=False)
    return _to_uint8(x).reshape(*hr.shape[:-2], h // scale, w // scale)


def bicubic_up(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """Plain bicubic upsampling (uint8, or float on the 0..255 scale) to float in [0, 255]: the 'bicubic' baseline."""
    _check_scale(scale)
    h, w = lr.shape[-2:]
    x = F.interpolate(_batched(lr), size=(h * scale, w * scale), mode="bicubic", align_corners=False)
    return x.clamp(0, 255).reshape(*lr.shape[:-2], h * scale, w * scale)


def gaussian_kernel(sigma_x: float, sigma_y: float, theta: float, size: int = KERNEL) -> torch.Tensor:
    """Normalised (size, size) anisotropic Gaussian with axis sigmas rotated by theta (radians)."""
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    inv_cov = np.linalg.inv(rot @ np.diag([sigma_x**2, sigma_y**2]) @ rot.T)
    r = np.arange(size) - size // 2
    xy = np.stack(np.meshgrid(r, r, indexing="xy"), axis=-1)  # (size, size, 2) as (x, y)
    k = np.exp(-0.5 * np.einsum("...i,ij,...j->...", xy, inv_cov, xy))
    return torch.from_numpy(k / k.sum()).float()


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    pad = kernel.shape[-1] // 2
    # replicate padding works for any crop size (reflect needs the image wider than the kernel radius)
    x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(x, kernel.expand(c, 1, *kernel.shape), groups=c)


def _jpeg(lr: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode a uint8 (C, h, w) image as JPEG in memory."""
    array = lr.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=quality)
    decoded = np.asarray(Image.open(buf).convert(picture.mode))
    return torch.from_numpy(decoded.copy()).reshape(array.shape).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class Degradation:
    """How an HR image becomes a training pair; call it with the image and a seeded rng."""

    scale: int
    """Downsampling factor, 2 or 4."""
    crop: int
    """Side of the random HR crop; divisible by `scale`."""
    blur: float = 0.0
    """Probability of a Gaussian blur before downsampling."""
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    """Range of the blur's sigmas (HR pixels); half the blurs are isotropic, half anisotropic and rotated."""
    noise: float = 0.0
    """Probability of Gaussian noise after downsampling."""
    noise_sigma: tuple[float, float] = (1.0, 25.0)
    """Range of the noise's standard deviation, on the 0..255 scale."""
    jpeg: float = 0.0
    """Probability of JPEG re-encoding at the end."""
    jpeg_quality: tuple[int, int] = (30, 95)
    """Range of the JPEG quality (both ends included)."""

    def __post_init__(self) -> None:
        _check_scale(self.scale)
        if self.crop < self.scale or self.crop % self.scale:
            raise DataError(f"super-resolution crop {self.crop} must be a positive multiple of the scale {self.scale}")

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """{"hr": uint8 (C, crop, crop), "lr": uint8 (C, crop/scale, crop/scale)} from a uint8 (C, H, W) image."""
        if image.dim() != 3 or image.dtype != torch.uint8:
            raise DataError(f"expected a uint8 (C, H, W) image, got {image.dtype} of shape {tuple(image.shape)}")
        h, w = image.shape[1:]
        if h < self.crop or w < self.crop:
            raise DataError(f"image of {w}x{h} (WxH) is smaller than the super-resolution crop {self.crop}")
        y, x = int(rng.integers(0, h - self.crop + 1)), int(rng.integers(0, w - self.crop + 1))
        hr = image[:, y:y + self.crop, x:x + self.crop].contiguous()

        lr = hr.float()[None]
        if rng.random() < self.blur:
            sx, sy = rng.uniform(*self.blur_sigma, size=2)
            if rng.random() < 0.5:  # isotropic
                sy = sx
            lr = _blur(lr, gaussian_kernel(sx, sy, rng.uniform(0, np.pi)))
        side = self.crop // self.scale
        lr = F.interpolate(lr, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
        if rng.random() < self.noise:
            sigma = rng.uniform(*self.noise_sigma)
            lr = lr + torch.from_numpy(rng.standard_normal(lr.shape, dtype=np.float32) * np.float32(sigma))
        lr = _to_uint8(lr[0])
        if rng.random() < self.jpeg:
            lr = _jpeg(lr, int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        return {"hr": hr, "lr": lr}
