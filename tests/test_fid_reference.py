"""ganforge's FID against an independent implementation (pytorch-fid) on the same two folders of PNGs,
with the same Inception weights file (random weights in the FID network's layout: no download)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow  # Inception passes over 2 x 60 images, twice, on CPU


def write_folder(images: np.ndarray, folder) -> None:
    os.makedirs(folder)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")


def read_folder(folder) -> torch.Tensor:
    """The PNGs as ganforge reads stored images: uint8 v -> v / 127.5 - 1, N x C x H x W."""
    arrays = [np.asarray(Image.open(folder / name)) for name in sorted(os.listdir(folder))]
    return torch.from_numpy(np.stack(arrays)).float().unsqueeze(1) / 127.5 - 1.0


def test_fid_equals_pytorch_fid_on_the_same_folders_and_weights(tmp_path, monkeypatch):
    from pytorch_fid.fid_score import calculate_fid_given_paths
    from sklearn.datasets import load_digits
    from torchvision.models import inception_v3

    from trainer.evaluation.fid import fid
    from trainer.evaluation.inception import InceptionFeatures, build_inception, load_inception

    digits = load_digits().images
    big = np.stack([np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
                    for d in digits[:120]])
    rng = np.random.default_rng(0)
    noisy = np.clip(big[60:].astype(np.float64) + rng.normal(0, 40, big[60:].shape), 0, 255).astype(np.uint8)
    write_folder(big[:60], tmp_path / "a")
    write_folder(noisy, tmp_path / "b")

    # Random weights in the FID network's layout, with BN statistics measured on 32 of the images
    # (random statistics would blow the activations up to ~1e10 and make any comparison meaningless).
    torch.manual_seed(0)
    net = build_inception(fid_variant=True)
    net.load_state_dict(inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True).state_dict())
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batch
            m.reset_running_stats()
    calibration = torch.from_numpy(np.concatenate([big[:16], noisy[:16]])).float().unsqueeze(1) / 127.5 - 1
    features = InceptionFeatures(net, "calibration")
    features.net.train()
    features(calibration)
    net.eval()
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    os.makedirs(hub)
    weights = hub / "pt_inception-2015-12-05-6726825d.pth"  # the name pytorch-fid fetches; found in the cache
    torch.save(net.state_dict(), weights)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    theirs = calculate_fid_given_paths([str(tmp_path / "a"), str(tmp_path / "b")], batch_size=50, device="cpu",
                                       dims=2048, num_workers=0)
    extractor = load_inception(str(weights))
    with torch.no_grad():
        ours = fid(extractor(read_folder(tmp_path / "a")).double(), extractor(read_folder(tmp_path / "b")).double())
    assert theirs > 1.0  # the two folders differ, so the comparison means something
    assert ours == pytest.approx(theirs, rel=1e-3), (ours, theirs)
