"""Super-resolution data: on-the-fly degradations, the packaged sr_photos build, and tiled upscaling."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data_pipeline import DataError, load_index
from data_pipeline.degrade import Degradation, bicubic_down, bicubic_up
from data_pipeline.loader import decode_samples
from trainer.tiling import upscale_tiled


def photo(channels: int = 3, h: int = 70, w: int = 90) -> torch.Tensor:
    """A smooth picture with some texture, so every degradation visibly changes it."""
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 5.0) * np.cos(y / 7.0) + 30 * np.sin((x + y) / 2.0)
    return torch.from_numpy(np.stack([base + 10 * c for c in range(channels)]).clip(0, 255).astype(np.uint8))


def pair(deg: Degradation, seed: int, image: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return deg(photo() if image is None else image, np.random.default_rng([seed, 0, 5, 2]))


@pytest.mark.parametrize("channels", [1, 3])
def test_pairs_have_the_promised_shapes_and_dtypes(channels):
    out = pair(Degradation(scale=4, crop=32, blur=0.5, noise=0.5, jpeg=0.5), 0, photo(channels))
    assert out["hr"].shape == (channels, 32, 32) and out["hr"].dtype == torch.uint8
    assert out["lr"].shape == (channels, 8, 8) and out["lr"].dtype == torch.uint8


def test_a_pair_is_a_pure_function_of_the_image_and_the_rng_seed():
    deg = Degradation(scale=2, crop=32, blur=0.5, noise=0.5, jpeg=0.5)
    a, b = pair(deg, 7), pair(deg, 7)
    assert torch.equal(a["hr"], b["hr"]) and torch.equal(a["lr"], b["lr"])
    crops = {pair(deg, seed)["hr"].numpy().tobytes() for seed in range(8)}
    assert len(crops) > 1  # another seed, another crop position


def test_without_degradations_the_lr_is_bicubic_down_of_the_hr_crop():
    for scale in (2, 4):
        out = pair(Degradation(scale=scale, crop=48), 3)
        assert torch.equal(out["lr"], bicubic_down(out["hr"], scale))


@pytest.mark.parametrize("kind", ["blur", "noise", "jpeg"])
def test_each_degradation_changes_the_lr_when_certain(kind):
    clean = pair(Degradation(scale=4, crop=64), 1)
    degraded = pair(Degradation(scale=4, crop=64, **{kind: 1.0}), 1)
    assert torch.equal(clean["hr"], degraded["hr"])  # same draws decide the crop
    assert not torch.equal(clean["lr"], degraded["lr"])


def test_bicubic_up_is_plain_bicubic_clamped_to_the_pixel_range():
    lr = bicubic_down(photo(h=64, w=80), 4)
    up = bicubic_up(lr, 4)
    assert up.shape == (3, 64, 80) and up.dtype == torch.float32
    assert float(up.min()) >= 0 and float(up.max()) <= 255
    assert torch.equal(bicubic_up(lr.float(), 4), up)


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": 3, "crop": 48}, "scale 3"),
    ({"scale": 4, "crop": 30}, "multiple of the scale"),
])
def test_bad_degradation_arguments_are_one_clear_data_error(kwargs, message):
    with pytest.raises(DataError, match=message) as err:
        Degradation(**kwargs)
    assert "\n" not in str(err.value)


def test_an_image_smaller_than_the_crop_is_a_data_error():
    with pytest.raises(DataError, match="smaller than the super-resolution crop 96"):
        pair(Degradation(scale=4, crop=96), 0)
    with pytest.raises(DataError, match="must divide"):
        bicubic_down(photo(h=30, w=32), 4)


@pytest.fixture(scope="module")
def sr_photos(tmp_path_factory) -> str:
    from data_pipeline.packaged import ensure_built

    root = str(tmp_path_factory.mktemp("sr") / "sr_photos")
    ensure_built("sr_photos", root, 32)
    return root


def test_sr_photos_has_shards_of_the_right_sizes_and_png_files(sr_photos):
    train, test = load_index(os.path.join(sr_photos, "train")), load_index(os.path.join(sr_photos, "test"))
    assert train.meta["size"] == 48 and train.meta["channels"] == 3 and train.num_samples >= 800
    assert test.meta["size"] == 32 and test.meta["channels"] == 3 and test.num_samples == 64
    hr_files = sorted(os.listdir(os.path.join(sr_photos, "images", "test_hr")))
    assert hr_files == sorted(os.listdir(os.path.join(sr_photos, "images", "test_lr_x4")))
    assert len(hr_files) == 64
    hr = np.array(Image.open(os.path.join(sr_photos, "images", "test_hr", hr_files[5])))
    lr = np.array(Image.open(os.path.join(sr_photos, "images", "test_lr_x4", hr_files[5])))
    assert hr.shape == (32, 32, 3) and lr.shape == (8, 8, 3)
    assert np.array_equal(lr, bicubic_down(torch.from_numpy(hr).permute(2, 0, 1), 4).permute(1, 2, 0).numpy())
    assert np.array_equal(hr, decode_samples(test, [5])[0]["image"].permute(1, 2, 0).numpy())


def test_sr_photos_held_out_patches_come_from_regions_no_training_patch_touches(sr_photos):
    """The plan's boxes are disjoint across splits, and the shards hold exactly those crops."""
    from data_pipeline.packaged import _sr_pictures, sr_patch_plan, sr_regions

    pictures = _sr_pictures()
    plan = sr_patch_plan({k: p.size for k, p in pictures.items()}, 32)

    def inside(box, region):
        return region[0] <= box[0] and region[1] <= box[1] and box[2] <= region[2] and box[3] <= region[3]

    for split, which in (("train", 0), ("test", 1)):
        for name, box in plan[split]:
            regions = sr_regions(*pictures[name].size)
            assert inside(box, regions[which]) and not inside(box, regions[1 - which])
        index = load_index(os.path.join(sr_photos, split))
        assert index.num_samples == len(plan[split])
        for i, sample in enumerate(decode_samples(index, range(index.num_samples))):
            name, box = plan[split][i]
            assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), np.asarray(pictures[name].crop(box)))
    for train_region, test_region in (sr_regions(*p.size) for p in pictures.values()):
        overlap_w = min(train_region[2], test_region[2]) - max(train_region[0], test_region[0])
        overlap_h = min(train_region[3], test_region[3]) - max(train_region[1], test_region[1])
        assert overlap_w <= 0 or overlap_h <= 0


def local_sr_net(scale: int) -> nn.Module:
    """Receptive field of 2 LR pixels before upsampling plus 2 HR pixels after: well within overlap 8."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.Upsample(scale_factor=scale, mode="nearest"), nn.Conv2d(8, 8, 3, padding=1),
                         nn.LeakyReLU(0.2), nn.Conv2d(8, 3, 3, padding=1), nn.Tanh()).eval()


@pytest.mark.parametrize("scale", [2, 4])
def test_tiled_upscaling_equals_the_whole_image_pass(scale):
    net = local_sr_net(scale)
    lr = torch.rand(2, 3, 50, 37) * 2 - 1
    whole = upscale_tiled(net, lr, scale)
    assert whole.shape == (2, 3, 50 * scale, 37 * scale)
    for tile in (16, 7, 64):  # several tiles, odd leftovers, and one tile larger than the image
        tiled = upscale_tiled(net, lr, scale, tile=tile, overlap=8)
        assert tiled.shape == whole.shape
        # measured max difference on CPU: exactly 0.0; the tolerance allows for other conv algorithms
        assert torch.allclose(tiled, whole, atol=1e-5, rtol=0)
    too_little_context = upscale_tiled(net, lr, scale, tile=16, overlap=1)  # the check above has teeth
    assert not torch.allclose(too_little_context, whole, atol=1e-3, rtol=0)


def test_tiled_upscaling_of_one_unbatched_image_keeps_its_layout():
    net = local_sr_net(2)
    lr = torch.rand(3, 9, 13) * 2 - 1
    out = upscale_tiled(net, lr, 2, tile=4, overlap=4)
    assert out.shape == (3, 18, 26)
    assert torch.allclose(out, upscale_tiled(net, lr, 2), atol=1e-5, rtol=0)
