"""StyleGAN2 (Karras et al. 2020) in plain PyTorch: mapping and synthesis networks, ResNet D.

Follows NVlabs' stylegan2-ada-pytorch `training/networks.py` without its custom CUDA ops:
modulated/demodulated convolutions as one grouped convolution per batch, per-layer noise with
learned strength, a skip generator (toRGB at every resolution, upsampled and summed), a
residual discriminator with a minibatch standard-deviation layer, and equalised learning rate
(weights stored at unit variance, scaled at run time). Up- and down-sampling use the paper's
[1, 3, 3, 1] low-pass filter as depthwise (transposed) convolutions, and the resampling
convolutions are computed as the reference computes them (borders included), so its weights
give its outputs here: G's upsampling conv is a stride-2 transposed convolution followed by the
filter, D's downsampling conv the filter followed by a stride-2 convolution.

The generator's forward takes everything random as arguments (latents, a second latent and a
per-sample cutoff for style mixing, noise maps), so the trainer can draw them reproducibly; in
eval mode without noise maps it uses fixed ones, so a seed gives the same image every time.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.precision import upcast

LRELU_GAIN = math.sqrt(2.0)  # keeps activations at unit variance after leaky ReLU(0.2)


def channels_at(res: int, base: int, cap: int) -> int:
    """Feature maps at resolution `res`: base / res, at most `cap` (and at least 1)."""
    return max(1, min(cap, base // res))


@functools.cache
def _fir(gain: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 4x4 [1, 3, 3, 1] filter, built once per device and dtype (no host copy per layer and step)."""
    k = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device, dtype=dtype)
    k = torch.outer(k, k)
    return k / k.sum() * gain


def upsample2(x: torch.Tensor) -> torch.Tensor:
    """2x upsampling: zero insertion then the [1, 3, 3, 1] filter (a depthwise transposed conv)."""
    c = x.shape[1]
    f = _fir(4.0, x.device, x.dtype).expand(c, 1, 4, 4)
    return F.conv_transpose2d(x, f, stride=2, padding=1, groups=c)


def blur(x: torch.Tensor, padding: int, gain: float = 1.0, stride: int = 1) -> torch.Tensor:
    """The [1, 3, 3, 1] filter over each map, zero-padded by `padding` (a depthwise conv)."""
    c = x.shape[1]
    f = _fir(gain, x.device, x.dtype).expand(c, 1, 4, 4)
    return F.conv2d(x, f, padding=padding, stride=stride, groups=c)


def downsample2(x: torch.Tensor) -> torch.Tensor:
    """2x downsampling: the [1, 3, 3, 1] low-pass filter, then every second pixel."""
    return blur(x, padding=1, stride=2)


def conv3x3_up2(x: torch.Tensor, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """A 3x3 convolution of x upsampled 2x, as the reference computes it: a stride-2 transposed
    convolution (H -> 2H + 1), then the filter (gain 4, padded by 1) back to 2H.

    On an unbounded plane this is upsample2 then a convolution with the weight rotated by 180
    degrees; here the padding happens once, before both, so the border pixels see the whole
    filtered signal. weight: (O, I / groups, 3, 3) as for conv2d.
    """
    o, i, kh, kw = weight.shape
    # conv_transpose2d takes (in, out / groups, k, k) per group
    wt = weight.reshape(groups, o // groups, i, kh, kw).transpose(1, 2).reshape(groups * i, o // groups, kh, kw)
    return blur(F.conv_transpose2d(x, wt, stride=2, groups=groups), padding=1, gain=4.0)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * LRELU_GAIN


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate (and an optional lr multiplier, as in the mapping net)."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_mul / math.sqrt(in_features)
        self.lr_mul, self.activate = lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_mul)
        return lrelu(x) if self.activate else x


class EqualConv2d(nn.Module):
    """Convolution with equalised learning rate; `down` halves the size as the reference does: a 1x1
    conv of the low-passed, decimated input, a larger one with stride 2 over the low-passed input."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True, activate: bool = True,
                 down: bool = False, gain: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.weight_gain = gain / math.sqrt(in_ch * kernel * kernel)
        self.activate, self.down, self.padding = activate, down, kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.weight_gain
        if not self.down:
            x = F.conv2d(x, weight, self.bias, padding=self.padding)
        elif weight.shape[-1] == 1:
            x = F.conv2d(downsample2(x), weight, self.bias)
        else:  # the filter padded by k // 2 + 1 at full size, then every second output of the conv
            x = F.conv2d(blur(x, padding=self.padding + 1), weight, self.bias, stride=2)
        return lrelu(x) if self.activate else x


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True,
                     padding: int = 1, fused: bool = True, up: bool = False) -> torch.Tensor:
    """Per-sample weights w'[b] = weight * styles[b] (over input maps), divided by their norm per
    output map when demodulating, applied as one grouped convolution over the whole batch;
    `up` convolves the 2x upsampled input (conv3x3_up2; 3x3 weights).

    `fused` False gives the same result with one shared convolution between input and output
    scalings: no batch-sized `groups`, so exported graphs keep a free batch size.
    x: (B, I, H, W); weight: (O, I, k, k); styles: (B, I).
    """
    b, i, h, w = x.shape
    o, _, kh, kw = weight.shape
    conv = conv3x3_up2 if up else functools.partial(F.conv2d, padding=padding)
    wb = weight.unsqueeze(0) * styles.reshape(b, 1, i, 1, 1)
    if not fused:
        out = conv(x * styles.reshape(b, i, 1, 1), weight)
        if demodulate:
            out = out * (wb.square().sum(dim=(2, 3, 4)) + 1e-8).rsqrt().reshape(b, o, 1, 1)
        return out
    if demodulate:
        wb = wb * (wb.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8).rsqrt()
    out = conv(x.reshape(1, b * i, h, w), wb.reshape(b * o, i, kh, kw), groups=b)
    return out.reshape(b, o, *out.shape[2:])


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally of the 2x upsampled input), plus scaled noise, bias and leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, res: int, up: bool = False):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.register_buffer("noise_const", torch.randn(1, 1, res, res))
        self.weight_gain = 1 / math.sqrt(in_ch * 9)
        self.up, self.res = up, res
        self.fused_modconv = True  # see modulated_conv2d

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        x = modulated_conv2d(x, self.weight * self.weight_gain, self.affine(w), fused=self.fused_modconv, up=self.up)
        if noise is None:
            noise = self.noise_const if not self.training else torch.randn(len(x), 1, self.res, self.res,
                                                                           device=x.device, dtype=x.dtype)
        x = x + noise * self.noise_strength
        return lrelu(x + self.bias.reshape(1, -1, 1, 1))


class ToRGB(nn.Module):
    """Modulated 1x1 conv to image channels, not demodulated."""

    def __init__(self, in_ch: int, img_ch: int, w_dim: int):
        super().__init__()
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(img_ch, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.zeros(img_ch))
        self.weight_gain = 1 / math.sqrt(in_ch)
        self.fused_modconv = True

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        out = modulated_conv2d(x, self.weight, styles, demodulate=False, padding=0, fused=self.fused_modconv)
        return out + self.bias.reshape(1, -1, 1, 1)


class SynthesisBlock(nn.Module):
    """One resolution: (const input | upsampling conv), conv, toRGB added to the upsampled image."""

    def __init__(self, in_ch: int, out_ch: int, w_dim: int, res: int, img_ch: int):
        super().__init__()
        self.first = res == 4
        if self.first:
            self.const = nn.Parameter(torch.randn(out_ch, 4, 4))
        else:
            self.conv0 = SynthesisLayer(in_ch, out_ch, w_dim, res, up=True)
        self.conv1 = SynthesisLayer(out_ch, out_ch, w_dim, res)
        self.torgb = ToRGB(out_ch, img_ch, w_dim)
        self.num_conv = 1 if self.first else 2

    def forward(self, x: torch.Tensor | None, img: torch.Tensor | None, ws: torch.Tensor,
                noise: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.first:
            x = self.const.unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, ws[:, 0], noise[0])
        else:
            x = self.conv0(x, ws[:, 0], noise[0])
            x = self.conv1(x, ws[:, 1], noise[1])
        y = self.torgb(x, ws[:, self.num_conv])
        img = y if img is None else upsample2(img) + y
        return x, img


class MappingNetwork(nn.Module):
    """z -> w: normalise z, then `layers` equalised fully connected layers with lr multiplier 0.01.

    `w_avg` follows the mean w (decay 0.995) for the truncation trick.
    """

    def __init__(self, z_dim: int, w_dim: int, layers: int, lr_mul: float = 0.01, w_avg_beta: float = 0.995):
        super().__init__()
        dims = [z_dim] + [w_dim] * layers
        self.net = nn.Sequential(*(EqualLinear(a, b, lr_mul=lr_mul, activate=True) for a, b in zip(dims[:-1], dims[1:], strict=True)))
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.w_avg_beta = w_avg_beta

    def forward(self, z: torch.Tensor, psi: float = 1.0, update_w_avg: bool = False) -> torch.Tensor:
        z = z * (z.square().mean(dim=1, keepdim=True) + 1e-8).rsqrt()
        w = self.net(z)
        if update_w_avg:
            with torch.no_grad():
                self.w_avg.lerp_(upcast(w.detach()).mean(0).to(self.w_avg.dtype), 1 - self.w_avg_beta)
        if psi != 1.0:
            w = self.w_avg.to(w.dtype).lerp(w, psi)
        return w


class StyleGAN2Generator(nn.Module):
    """Mapping network plus skip-architecture synthesis network; images in [-1, 1] (not clamped)."""

    def __init__(self, z_dim: int, w_dim: int, map_layers: int, resolution: int, img_channels: int,
                 channel_base: int, channel_max: int):
        super().__init__()
        self.z_dim, self.w_dim, self.resolution = z_dim, w_dim, resolution
        self.mapping = MappingNetwork(z_dim, w_dim, map_layers)
        blocks, res, in_ch = [], 4, 0
        while res <= resolution:
            out_ch = channels_at(res, channel_base, channel_max)
            blocks.append(SynthesisBlock(in_ch, out_ch, w_dim, res, img_channels))
            in_ch, res = out_ch, res * 2
        self.blocks = nn.ModuleList(blocks)
        # Block i reads ws[2i] (and 2i + 1), its toRGB the next one: 2 log2(res) - 2 in all.
        self.num_ws = 2 * int(math.log2(resolution)) - 2

    def noise_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Shapes of the per-layer noise maps `synthesis` takes, in order."""
        return [(batch, 1, b.conv1.res, b.conv1.res) for b in self.blocks for _ in range(b.num_conv)]

    def mix(self, w: torch.Tensor, w_mix: torch.Tensor | None, cutoff: torch.Tensor | None) -> torch.Tensor:
        """(B, num_ws, w_dim): w for layers before each sample's cutoff, w_mix from it on."""
        ws = w.unsqueeze(1).expand(-1, self.num_ws, -1)
        if w_mix is None or cutoff is None:
            return ws
        layer = torch.arange(self.num_ws, device=w.device).unsqueeze(0)
        return torch.where((layer < cutoff.unsqueeze(1)).unsqueeze(2), ws, w_mix.unsqueeze(1))

    def synthesis(self, ws: torch.Tensor, noise: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = img = None
        i = j = 0
        for block in self.blocks:
            n = noise[j:j + block.num_conv] if noise is not None else [None] * block.num_conv
            x, img = block(x, img, ws[:, i:i + block.num_conv + 1], n)
            i, j = i + block.num_conv, j + block.num_conv
        return img

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None, *, psi: float = 1.0,
                z_mix: torch.Tensor | None = None, mix_cutoff: torch.Tensor | None = None,
                noise: list[torch.Tensor] | None = None, update_w_avg: bool = False,
                return_ws: bool = False):
        """G(z): image, or (image, ws) with return_ws (the path-length penalty differentiates by ws)."""
        w = self.mapping(z, psi, update_w_avg)
        w_mix = self.mapping(z_mix, psi) if z_mix is not None else None
        ws = self.mix(w, w_mix, mix_cutoff)
        img = self.synthesis(ws, noise)
        return (img, ws) if return_ws else img


class SamplingGenerator(nn.Module):
    """A generator for sampling: truncation `psi` and a noise mode (const: the stored maps,
    random: fresh maps drawn from `seed`, none: zero), as in StyleGAN2-ADA's generate.py."""

    def __init__(self, g: StyleGAN2Generator, psi: float, noise_mode: str = "const", seed: int = 0):
        super().__init__()
        self.g, self.psi, self.noise_mode = g, psi, noise_mode
        self.draw = torch.Generator().manual_seed(seed)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        noise = None
        if self.noise_mode != "const":
            make = torch.zeros if self.noise_mode == "none" else \
                lambda shape: torch.randn(shape, generator=self.draw)
            noise = [make(shape).to(z.device, z.dtype) for shape in self.g.noise_shapes(len(z))]
        return self.g(z, labels, psi=self.psi, noise=noise)


def minibatch_stddev(x: torch.Tensor, group: int) -> torch.Tensor:
    """Append one map: the std of each feature over a group of samples, averaged (Karras et al. 2018).

    Groups take samples i, i + N/G, ..., as in the reference; a group size that does not divide
    the batch shrinks to the largest one that does.
    """
    n, c, h, w = x.shape
    g = math.gcd(min(group, n), n)
    y = upcast(x).reshape(g, -1, c, h, w)
    y = (y - y.mean(0)).square().mean(0).add(1e-8).sqrt().mean(dim=(1, 2, 3))  # (N/G,)
    y = y.reshape(-1, 1, 1, 1).repeat(g, 1, h, w).to(x.dtype)
    return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """Residual block: two 3x3 convs (the second halving the size) plus a 1x1 skip, scaled by 1/sqrt(2)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv0 = EqualConv2d(in_ch, in_ch, 3)
        self.conv1 = EqualConv2d(in_ch, out_ch, 3, down=True)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False, activate=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.skip(x) + self.conv1(self.conv0(x))) * math.sqrt(0.5)


class StyleGAN2Discriminator(nn.Module):
    """fromRGB, residual blocks down to 4x4, minibatch std, conv, two fully connected layers -> logit."""

    def __init__(self, resolution: int, img_channels: int, channel_base: int, channel_max: int,
                 mbstd_group: int = 4):
        super().__init__()
        ch = lambda r: channels_at(r, channel_base, channel_max)  # noqa: E731
        self.from_rgb = EqualConv2d(img_channels, ch(resolution), 1)
        blocks, res = [], resolution
        while res > 4:
            blocks.append(DiscriminatorBlock(ch(res), ch(res // 2)))
            res //= 2
        self.blocks = nn.Sequential(*blocks)
        self.mbstd_group = mbstd_group
        c4 = ch(4)
        self.conv = EqualConv2d(c4 + (1 if mbstd_group else 0), c4, 3)
        self.fc = EqualLinear(c4 * 16, c4, activate=True)
        self.out = EqualLinear(c4, 1)

    def forward(self, img: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = self.blocks(self.from_rgb(img))
        if self.mbstd_group:
            x = minibatch_stddev(x, self.mbstd_group)
        x = self.conv(x)
        return self.out(self.fc(x.flatten(1))).squeeze(1)


def build(cfg) -> tuple[nn.Module, nn.Module]:
    """`model.arch=stylegan2`: (G, D) from the model section."""
    g = StyleGAN2Generator(cfg.z_dim, cfg.w_dim, cfg.map_layers, cfg.resolution, cfg.channels, cfg.channel_base,
                           cfg.g_width)
    d = StyleGAN2Discriminator(cfg.resolution, cfg.channels, cfg.channel_base, cfg.d_width, cfg.mbstd_group)
    return g, d
