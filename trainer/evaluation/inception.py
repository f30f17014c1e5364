"""Inception-v3 pool features (2048-d) from a weights file the user provides.

Two state-dict layouts are accepted, both in torchvision's `Inception3` parameter names:

- the FID network (`pt_inception-2015-12-05-6726825d.pth`, the TensorFlow FID graph ported to
  PyTorch by pytorch-fid; 1008 classes). Its pooling differs from torchvision's in a few
  blocks; those blocks are rebuilt here so features match the published FID numbers;
- torchvision's ImageNet weights (`inception_v3_google-0cc3c7bd.pth`, 1000 classes). Scores are
  then internally consistent but not comparable to published FIDs.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from trainer.evaluation.errors import EvaluationError

FID_CLASSES = 1008  # the 2015 TensorFlow graph's classifier width: marks the FID weights


class _FIDInceptionA(InceptionA):
    """The TF graph averages over valid pixels only at the border (count_include_pad=False)."""

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), b5, b3, pool]


class _FIDInceptionC(InceptionC):
    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = conv(d)
        pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return [self.branch1x1(x), b7, d, pool]


class _FIDInceptionE(InceptionE):
    """Mixed_7b averages without padding; Mixed_7c max-pools (a quirk of the TF graph)."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, 3, stride=1, padding=1)
        else:
            pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return [self.branch1x1(x), b3, d, self.branch_pool(pooled)]


def build_inception(fid_variant: bool) -> Inception3:
    """An uninitialised Inception3 in the layout of the FID weights or torchvision's ImageNet weights."""
    net = Inception3(num_classes=FID_CLASSES if fid_variant else 1000, aux_logits=False,
                     transform_input=False, init_weights=False)
    if fid_variant:
        net.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = _FIDInceptionE(1280, max_pool=False)
        net.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
    return net


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] (any size, 1 or 3 channels) -> 2048-d pool3 features."""

    num_features = 2048

    def __init__(self, net: Inception3, key: str):
        super().__init__()
        self.net = net.eval()
        self.key = key  # identifies these weights in cache file names

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # BN must keep its ImageNet statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        # Both weight sets expect 299x299 input scaled to [-1, 1], which is the generator's range.
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a,
                      n.Mixed_6b, n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def file_digest(path: str) -> str:
    """First 16 hex digits of the file's sha256: names the weights in cache keys."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_inception(path: str) -> InceptionFeatures:
    """InceptionFeatures from a local state-dict file; EvaluationError names the file on any problem."""
    if not path or not os.path.isfile(path):
        raise EvaluationError(f"eval.inception_weights: no such file {path!r} (see docs/evaluation.md "
                              "for where to get the FID Inception weights)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling raises many kinds
        raise EvaluationError(f"{path}: not a loadable weights file ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "fc.weight" not in state:
        raise EvaluationError(f"{path}: not an Inception-v3 state dict (no 'fc.weight' tensor)")
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    fid_variant = state["fc.weight"].shape[0] == FID_CLASSES
    net = build_inception(fid_variant)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise EvaluationError(f"{path}: Inception-v3 weights do not match the architecture ({first})") from None
    kind = "inception-fid" if fid_variant else "inception-imagenet"
    return InceptionFeatures(net, f"{kind}-{file_digest(path)}")
