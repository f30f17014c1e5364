"""Comparable FID: generated images reach Inception as the 8-bit images real ones are, and ganforge's
FID equals an independent implementation's (pytorch-fid) on the same folders and weights file.

The Inception weights are random, in the layout of the standard FID file
(`pt_inception-2015-12-05-6726825d.pth`: torchvision `Inception3` names, 1008 classes), so nothing
is downloaded; their BN statistics are measured on some of the images, since random statistics
blow the activations up to ~1e10 and make any comparison meaningless.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

N = 64  # images per folder
N_ZERO = 16  # images through each path in the FID-zero test (bit equality needs no more)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[str, str]:
    """Two folders of N 32x32 PNGs: sklearn digits as grey images, and other digits with colour
    noise as RGB images (both of pytorch-fid's and ganforge's grey-to-RGB steps are exercised)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("fid_folders")
    digits = np.stack([np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((32, 32), Image.BILINEAR))
                       for d in load_digits().images[:2 * N]])
    noise = np.random.default_rng(0).normal(0, 40, (N, 32, 32, 3))
    noisy = np.clip(digits[N:, :, :, None] + noise, 0, 255).astype(np.uint8)
    for name, images in (("a", digits[:N]), ("b", noisy)):
        os.makedirs(root / name)
        for i, img in enumerate(images):
            Image.fromarray(img).save(root / name / f"{i:04d}.png")
    return str(root / "a"), str(root / "b")


def pytorch_fid_loading(path: str):
    """pytorch-fid's loader for the FID weights URL, answered from `path` (no download is possible)."""
    from pytorch_fid.inception import FID_WEIGHTS_URL

    def load(url: str, **_) -> dict[str, torch.Tensor]:
        assert url == FID_WEIGHTS_URL  # pytorch-fid asks for the standard FID file and gets ours
        return torch.load(path, map_location="cpu", weights_only=True)

    return load


@pytest.fixture(scope="module")
def fid_weights(folders, tmp_path_factory) -> str:
    """A random Inception weights file in the standard FID file's format, written with pytorch-fid's
    own network (BN statistics averaged over 16 images of each folder)."""
    import pytorch_fid.inception as pfi
    from torchvision.models import inception_v3

    path = str(tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth")
    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True).state_dict(), path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", pytorch_fid_loading(path))
        net = pfi.fid_inception_v3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batch
            m.reset_running_stats()
    pictures = [np.asarray(Image.open(os.path.join(f, name)).convert("RGB"))
                for f in folders for name in sorted(os.listdir(f))[:16]]
    x = torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        net.train()(F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1)
    torch.save(net.eval().state_dict(), path)
    return path


@pytest.mark.slow  # Inception-v3 over 2 x 2 x 64 images at 299x299 on CPU
def test_fid_of_folders_equals_pytorch_fid_on_the_same_folders_and_weights_file(folders, fid_weights, monkeypatch):
    """Both read the PNGs as 8-bit RGB and resize to 299x299 bilinearly (align_corners=False) inside
    the network. pytorch-fid resizes x in [0, 1] and then takes 2x - 1, ganforge resizes
    v / 127.5 - 1: the same affine map on either side of a linear resize, so the inputs differ only
    by float32 rounding (~1e-7), far below the 1e-3 asked of the FID. The Fréchet distances differ
    in method too (scipy's sqrtm there, eigenvalues of S1 S2 in float64 here)."""
    import pytorch_fid.inception as pfi
    from pytorch_fid.fid_score import calculate_fid_given_paths

    from trainer.evaluation.folders import fid_of_folders

    monkeypatch.setattr(pfi, "load_state_dict_from_url", pytorch_fid_loading(fid_weights))
    theirs = calculate_fid_given_paths(list(folders), batch_size=50, device="cpu", dims=2048, num_workers=0)
    ours = fid_of_folders(*folders, fid_weights)
    assert theirs > 1.0  # the folders differ, so the comparison means something
    assert abs(ours - theirs) <= 1e-3, (ours, theirs)


@pytest.mark.slow  # Inception-v3 over 3 x 16 images at 299x299 (and the weights fixture's 32)
def test_the_same_8_bit_images_give_fid_zero_through_the_real_and_the_generated_path(digits_dir, fid_weights,
                                                                                     tmp_path):
    """Real digits read from the shards (the real-data path), and the same pictures as a generator
    would give them: floats off the 8-bit grid by up to 0.45 of a step, and at -1.2 where they are
    black (StyleGAN2 does not clamp), through the generated-data path. Both reach Inception as the
    same bytes, so the features are equal bit for bit and the FID is the noise floor of the Fréchet
    distance of a feature set with itself: -3.0e-5 measured here (-6.7e-5 with other random weights;
    covariance traces ~30). It is that large because torchmetrics sums square roots of the
    eigenvalues of S·S, and the ~2,030 zero eigenvalues of a 2048-d covariance of 16 samples come out
    of the non-symmetric eigensolver as float64 noise; with more samples than dimensions it is far
    smaller (test_evaluation.py: below 1e-6). Without the 8-bit step the FID is ~53."""
    from data_pipeline import load_index
    from tests.test_evaluation import _Replay
    from trainer.distributed import DistEnv
    from trainer.evaluation.fid import fid
    from trainer.evaluation.inception import load_inception
    from trainer.evaluation.real_data import read_samples, real_subset
    from trainer.evaluation.real_stats import real_features
    from trainer.evaluation.sharding import generated_features

    index, extractor = load_index(digits_dir), load_inception(fid_weights)
    images = read_samples(index, real_subset(index, N_ZERO))[0]
    off_grid = images + (torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.9 / 127.5
    off_grid[images == -1] = -1.2
    real = real_features(index, extractor, N_ZERO, str(tmp_path))
    fake = generated_features(_Replay(off_grid), extractor, N_ZERO, 16, 0, DistEnv(0, 1, 0, torch.device("cpu")))
    assert torch.equal(fake, real)
    assert abs(fid(real, fake)) < 2e-4
    with torch.no_grad():
        unquantised = extractor(off_grid).double()
    assert fid(real, unquantised) > 1e-3  # without the 8-bit step the same pictures score apart


class _MeanColour(torch.nn.Module):
    """Features = each image's mean colour: enough to see what a folder's images become."""

    key, num_features = "mean-colour", 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean((2, 3))


def test_folder_images_are_read_as_8_bit_rgb_like_real_images_and_bad_folders_are_named(tmp_path):
    from trainer.evaluation.errors import EvaluationError
    from trainer.evaluation.folders import folder_features

    os.makedirs(tmp_path / "ok" / "sub")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "ok" / "white.png")  # grey
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok" / "sub" / "black.png")  # RGB, nested
    assert folder_features(str(tmp_path / "ok"), _MeanColour()).tolist() == [[-1.0] * 3, [1.0] * 3]  # sorted paths

    os.makedirs(tmp_path / "empty")
    with pytest.raises(EvaluationError, match="empty: FID needs at least 2 images, found 0"):
        folder_features(str(tmp_path / "empty"), _MeanColour())
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "ok" / "tall.png")
    with pytest.raises(EvaluationError, match="tall.png: 4x5 pixels, but .*black.png has 4x4"):
        folder_features(str(tmp_path / "ok"), _MeanColour())
