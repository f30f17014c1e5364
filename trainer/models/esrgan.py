"""Super-resolution networks of the ESRGAN family (Wang et al. 2018; Real-ESRGAN, Wang et al. 2021),
laid out as BasicSR (XPixelGroup/BasicSR, basicsr/archs/) lays them out, and the VGG19 perceptual loss.

The generator keeps BasicSR's module names (conv_first, body.<i>.rdb<j>.conv<k>, conv_body, conv_up1,
conv_up2, conv_hr, conv_last) so a BasicSR x4 RRDBNet state dict loads into RRDBNet(scale=4) as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from trainer.config import ConfigError


def conv3x3(cin: int, cout: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, 1, 1, bias=bias)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; the residual is scaled by 0.2 so 69 stacked blocks stay stable."""

    def __init__(self, width: int, growth: int):
        super().__init__()
        for i in range(5):
            self.add_module(f"conv{i + 1}", conv3x3(width + i * growth, width if i == 4 else growth))
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)
        # BasicSR's init: small residual branches at the start make the deep trunk near-identity.
        for m in self.children():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                m.weight.data.mul_(0.1)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            conv = getattr(self, f"conv{i}")
            feats.append(self.lrelu(conv(torch.cat(feats, 1))))
        return self.conv5(torch.cat(feats, 1)) * 0.2 + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks under one more 0.2-scaled residual."""

    def __init__(self, width: int, growth: int):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(width, growth)
        self.rdb2 = ResidualDenseBlock(width, growth)
        self.rdb3 = ResidualDenseBlock(width, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x


class RRDBNet(nn.Module):
    """ESRGAN generator: LR image (N, C, h, w) -> HR image (N, C, scale*h, scale*w), scale 2 or 4.

    The trunk works at LR resolution; each x2 stage is nearest-neighbour upsampling, a conv and
    LeakyReLU(0.2). Scale 4 has two stages (conv_up1, conv_up2), exactly BasicSR's RRDBNet. Scale 2
    has only the first stage (no conv_up2), unlike BasicSR, which pixel-unshuffles the input to
    half size and keeps both stages; so x2 BasicSR checkpoints do not load here.

    `skip="bicubic"` adds the bicubic upscaling of the input to the output, so the network learns
    only the residual (as VDSR does, and Real-ESRGAN's compact model with nearest upsampling): no
    parameters change, and a small network starts at bicubic's quality instead of learning it first.
    """

    def __init__(self, channels: int = 3, scale: int = 4, width: int = 64, blocks: int = 23,
                 growth: int = 32, skip: str = "none"):
        super().__init__()
        if scale not in (2, 4):
            raise ValueError(f"RRDBNet supports scale 2 or 4, not {scale}")
        if skip not in ("none", "bicubic"):
            raise ValueError(f"RRDBNet skip is none or bicubic, not {skip!r}")
        self.scale, self.skip = scale, skip
        self.conv_first = conv3x3(channels, width)
        self.body = nn.Sequential(*(RRDB(width, growth) for _ in range(blocks)))
        self.conv_body = conv3x3(width, width)
        self.conv_up1 = conv3x3(width, width)
        if scale == 4:
            self.conv_up2 = conv3x3(width, width)
        self.conv_hr = conv3x3(width, width)
        self.conv_last = conv3x3(width, channels)
        self.lrelu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        if self.scale == 4:
            feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(feat)))
        if self.skip == "bicubic":
            out = out + F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return out


class VGGStyleDiscriminator(nn.Module):
    """ESRGAN's discriminator: (N, C, size, size) -> logits (N, 1).

    Stages of conv3x3 + conv4x4/2, each with BatchNorm (except the very first conv) and
    LeakyReLU(0.2), widths 1, 2, 4, 8, 8, 8... x `width`, then linear 100 and linear 1. There are
    five stages (down to size/32) and one more per doubling beyond 128, so the linear layer sees
    at most 4x4: this is BasicSR's layout at 128 and 256, extended to any power of two >= 32.
    """

    def __init__(self, channels: int = 3, width: int = 64, size: int = 128):
        super().__init__()
        if size < 32 or size & (size - 1):
            raise ValueError(f"VGGStyleDiscriminator needs a power-of-two size >= 32, not {size}")
        self.size = size
        stages = max(5, size.bit_length() - 3)  # 128 = 2**7 -> 5 stages, 256 -> 6 (4x4 left)
        layers: list[nn.Module] = [conv3x3(channels, width), nn.LeakyReLU(0.2, True)]
        cin = width
        for k in range(stages):
            cout = width * min(2**k, 8)
            if k > 0:
                layers += [conv3x3(cin, cout, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True)]
            layers += [nn.Conv2d(cout, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout),
                       nn.LeakyReLU(0.2, True)]
            cin = cout
        side = size >> stages
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * side * side, 100), nn.LeakyReLU(0.2, True),
                                  nn.Linear(100, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"VGGStyleDiscriminator built for {self.size}x{self.size}, got {tuple(x.shape)}")
        return self.head(self.features(x))


class UNetDiscriminatorSN(nn.Module):
    """Real-ESRGAN's U-Net discriminator with spectral norm: (N, C, H, W) -> per-pixel logits
    (N, 1, H, W), for H and W divisible by 8.

    Per-pixel realness gives the generator local gradients, which Real-ESRGAN needs for its
    degraded, spatially varying inputs. Three stride-2 downs, three bilinear x2 ups with additive
    skips (when `skip`), two extra convs; all but the first and last conv spectrally normalised.
    """

    def __init__(self, channels: int = 3, width: int = 64, skip: bool = True):
        super().__init__()
        self.skip = skip
        w = width
        self.conv0 = conv3x3(channels, w)
        self.conv1 = spectral_norm(nn.Conv2d(w, w * 2, 4, 2, 1, bias=False))
        self.conv2 = spectral_norm(nn.Conv2d(w * 2, w * 4, 4, 2, 1, bias=False))
        self.conv3 = spectral_norm(nn.Conv2d(w * 4, w * 8, 4, 2, 1, bias=False))
        self.conv4 = spectral_norm(conv3x3(w * 8, w * 4, bias=False))
        self.conv5 = spectral_norm(conv3x3(w * 4, w * 2, bias=False))
        self.conv6 = spectral_norm(conv3x3(w * 2, w, bias=False))
        self.conv7 = spectral_norm(conv3x3(w, w, bias=False))
        self.conv8 = spectral_norm(conv3x3(w, w, bias=False))
        self.conv9 = conv3x3(w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 8 or x.shape[-2] % 8:
            raise ValueError(f"UNetDiscriminatorSN needs H and W divisible by 8, got {tuple(x.shape)}")
        x0 = F.leaky_relu(self.conv0(x), 0.2)
        x1 = F.leaky_relu(self.conv1(x0), 0.2)
        x2 = F.leaky_relu(self.conv2(x1), 0.2)
        out = F.leaky_relu(self.conv3(x2), 0.2)
        for conv, skip in ((self.conv4, x2), (self.conv5, x1), (self.conv6, x0)):
            out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=False)
            out = F.leaky_relu(conv(out), 0.2)
            if self.skip:
                out = out + skip
        out = F.leaky_relu(self.conv7(out), 0.2)
        out = F.leaky_relu(self.conv8(out), 0.2)
        return self.conv9(out)


# torchvision's vgg19 `features`: conv widths, "M" = 2x2 max pool. Layer names are VGG's blockN_M.
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
# Real-ESRGAN's choice (options/train_realesrgan_x4plus.yml).
REAL_ESRGAN_LAYERS = {"conv1_2": 0.1, "conv2_2": 0.1, "conv3_4": 1.0, "conv4_4": 1.0, "conv5_4": 1.0}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_features() -> tuple[nn.Sequential, dict[str, int]]:
    """torchvision's vgg19().features layout (so `features.<i>.*` keys load) and each conv's index."""
    layers: list[nn.Module] = []
    names: dict[str, int] = {}
    block, conv = 1, 1
    cin = 3
    for v in VGG19_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            block, conv = block + 1, 1
            continue
        names[f"conv{block}_{conv}"] = len(layers)
        # Not in place: the pre-ReLU features are kept as the taps.
        layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
        cin, conv = v, conv + 1
    return nn.Sequential(*layers), names


class VGGPerceptual(nn.Module):
    """Perceptual loss: weighted sum over VGG19 layers of the L1 distance between the pre-ReLU
    features of output and target, as Real-ESRGAN trains with.

    Images are in [-1, 1]; they are mapped to [0, 1] and ImageNet-normalised, as VGG was trained.
    The VGG is frozen and always in eval mode; the target's features carry no gradient.
    """

    def __init__(self, weights_path: str, layer_weights: dict[str, float] | None = None):
        super().__init__()
        features, names = vgg19_features()
        self.layer_weights = dict(layer_weights or REAL_ESRGAN_LAYERS)
        unknown = sorted(set(self.layer_weights) - set(names))
        if unknown:
            raise ValueError(f"unknown VGG19 layers {unknown}; known: {list(names)}")
        self.taps = {names[k]: k for k in self.layer_weights}
        load_vgg19_features(features, weights_path)
        # Layers after the deepest tap are never used: drop them.
        self.features = features[: max(self.taps) + 1].requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> VGGPerceptual:
        """Stay in eval mode whatever the caller's trainer asks for."""
        return super().train(False)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pre-ReLU features at the weighted layers, for images in [-1, 1]."""
        x = ((images + 1) / 2 - self.mean) / self.std
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                out[self.taps[i]] = x
        return out

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fo = self.extract(output)
        with torch.no_grad():
            ft = self.extract(target)
        return sum(w * F.l1_loss(fo[k], ft[k]) for k, w in self.layer_weights.items())


def load_vgg19_features(features: nn.Sequential, path: str) -> None:
    """Load the `features.*` entries of a torchvision vgg19 state dict; ConfigError on any problem."""

    def bad(what: str) -> ConfigError:
        return ConfigError("loss.perceptual_weights", f"{path}: {what}")

    if not Path(path).is_file():
        raise bad("no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn file, a pickle of something else: all mean "not usable weights"
        raise bad(f"not a torch weights file ({type(e).__name__}: {e})".splitlines()[0]) from e
    if not isinstance(state, dict):
        raise bad(f"holds a {type(state).__name__}, not a torchvision vgg19 state dict")
    expected = features.state_dict()
    missing = [k for k in expected if f"features.{k}" not in state]
    if missing:
        raise bad(f"not a torchvision vgg19 state dict: missing {len(missing)} keys such as features.{missing[0]}")
    for k, v in expected.items():
        got = state[f"features.{k}"]
        if not isinstance(got, torch.Tensor) or got.shape != v.shape:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise bad(f"features.{k} has shape {shape}, vgg19 needs {tuple(v.shape)}")
    features.load_state_dict({k: state[f"features.{k}"] for k in expected})


def build(cfg) -> tuple[nn.Module, nn.Module]:
    """`model.arch=esrgan`: the RRDB generator and the VGG-style or U-Net discriminator."""
    g = RRDBNet(cfg.channels, cfg.scale, cfg.g_width, cfg.n_blocks, cfg.growth, cfg.skip)
    d = (UNetDiscriminatorSN(cfg.channels, cfg.d_width) if cfg.d_arch == "unet"
         else VGGStyleDiscriminator(cfg.channels, cfg.d_width, cfg.resolution))
    return g, d
