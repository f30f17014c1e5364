"""PSNR and SSIM on the Y channel, by BasicSR's convention (basicsr/metrics/psnr_ssim.py), so
figures compare with the super-resolution literature: uint8 images, `border` pixels cropped on
every side (usually the scale), Y of ITU-R BT.601 YCbCr in [16, 235], float64 arithmetic.

One difference: BasicSR's metrics take cv2's BGR images; these take RGB tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# BT.601 luma weights for R, G, B in [0, 1], giving Y in [16, 235].
Y_WEIGHTS = (65.481, 128.553, 24.966)


def y_channel(images: torch.Tensor) -> torch.Tensor:
    """Y of uint8 RGB images (N, 3, H, W) as float64 (N, 1, H, W); 1-channel images pass through."""
    x = images.to(torch.float64)
    if x.shape[1] == 1:
        return x
    w = torch.tensor(Y_WEIGHTS, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return (x / 255.0 * w).sum(1, keepdim=True) + 16.0


def prepare(sr: torch.Tensor, hr: torch.Tensor, border: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as float64 Y (N, 1, H - 2 border, W - 2 border), after checking they can be compared."""
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")
    if sr.dtype != torch.uint8 or hr.dtype != torch.uint8:
        raise ValueError(f"SR metrics take uint8 images, got {sr.dtype} and {hr.dtype}")
    if sr.dim() == 3:
        sr, hr = sr[None], hr[None]
    if sr.dim() != 4 or sr.shape[1] not in (1, 3):
        raise ValueError(f"expected (N, 1 or 3, H, W) or (1 or 3, H, W) images, got {tuple(sr.shape)}")
    if border:
        sr = sr[..., border:-border, border:-border]
        hr = hr[..., border:-border, border:-border]
    return y_channel(sr), y_channel(hr)


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> float:
    """Mean over images of the Y-channel PSNR in dB (peak 255); inf where an image is exact."""
    a, b = prepare(sr, hr, border)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(255.0**2 / mse)).mean().item()


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 2-D Gaussian SSIM window (Wang et al. 2004), float64 (1, 1, size, size)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)[None, None]


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, border: int) -> float:
    """Mean over images of the Y-channel SSIM: 11x11 Gaussian window (sigma 1.5), 'valid' filtering."""
    a, b = prepare(sr, hr, border)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {tuple(a.shape[-2:])}")
    window = gaussian_window().to(a.device)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3)).mean().item()
