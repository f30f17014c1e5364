"""ESRGAN family: the generator matches BasicSR's RRDBNet, the discriminators' shapes, the VGG
perceptual loss and its weights-file errors, and the Y-channel PSNR/SSIM against scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.data import astronaut
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from trainer.config import ConfigError
from trainer.evaluation.sr_metrics import psnr_y, ssim_y
from trainer.models.esrgan import RRDBNet, UNetDiscriminatorSN, VGGPerceptual, VGGStyleDiscriminator


def basicsr_rrdbnet_params(num_in_ch: int, num_out_ch: int, num_feat: int, num_block: int,
                           num_grow_ch: int) -> int:
    """Parameter count of BasicSR's x4 RRDBNet, summed over the layers as
    basicsr/archs/rrdbnet_arch.py declares them (every conv is 3x3 with bias)."""

    def conv(cin: int, cout: int) -> int:
        return 9 * cin * cout + cout

    # ResidualDenseBlock: conv1..conv4 grow by num_grow_ch, conv5 returns to num_feat.
    rdb = sum(conv(num_feat + i * num_grow_ch, num_grow_ch) for i in range(4))
    rdb += conv(num_feat + 4 * num_grow_ch, num_feat)
    body = num_block * 3 * rdb  # RRDB = rdb1, rdb2, rdb3
    # conv_first, then conv_body, conv_up1, conv_up2, conv_hr, then conv_last.
    return conv(num_in_ch, num_feat) + body + 4 * conv(num_feat, num_feat) + conv(num_feat, num_out_ch)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def full_size(scale: int) -> RRDBNet:
    """The reference-size generator, built on the meta device: shapes without the 2 s of init."""
    with torch.device("meta"):
        return RRDBNet(3, scale, 64, 23, 32)


def test_rrdbnet_x4_has_basicsr_parameter_count():
    reference = basicsr_rrdbnet_params(3, 3, 64, 23, 32)
    assert reference == 16_697_987
    assert n_params(full_size(4)) == reference


def test_rrdbnet_x4_state_dict_keys_are_basicsr_names():
    convs = ["conv_first", "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]
    convs += [f"body.{b}.rdb{r}.conv{c}" for b in range(23) for r in (1, 2, 3) for c in range(1, 6)]
    assert set(full_size(4).state_dict()) == {f"{c}.{p}" for c in convs for p in ("weight", "bias")}


def test_rrdbnet_x2_drops_only_the_second_upsampling_conv():
    assert n_params(full_size(2)) == basicsr_rrdbnet_params(3, 3, 64, 23, 32) - (9 * 64 * 64 + 64)


@pytest.mark.parametrize("scale", [2, 4])
def test_rrdbnet_upscales_odd_sizes(scale):
    net = RRDBNet(channels=3, scale=scale, width=8, blocks=1, growth=4)
    lr = torch.randn(2, 3, 13, 9)
    assert net(lr).shape == (2, 3, 13 * scale, 9 * scale)


def test_rrdbnet_rejects_other_scales():
    with pytest.raises(ValueError, match="scale 2 or 4"):
        RRDBNet(scale=3)


@pytest.mark.parametrize("size", [128, 64])
def test_vgg_style_discriminator_gives_one_logit_per_image(size):
    d = VGGStyleDiscriminator(channels=3, width=8, size=size)
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1)


def test_vgg_style_discriminator_matches_basicsr_at_128_and_256():
    # BasicSR: conv0_0 (bias) + four-plus convs of each stage, BNs, linear1 from 4x4, linear2.
    def basicsr(nf: int, size: int) -> int:
        widths = [nf, nf * 2, nf * 4, nf * 8, nf * 8] + ([nf * 8] if size == 256 else [])
        total = 9 * 3 * nf + nf + 16 * nf * nf + 2 * nf  # conv0_0, conv0_1, bn0_1
        for cin, cout in zip(widths[:-1], widths[1:], strict=True):
            total += 9 * cin * cout + 2 * cout + 16 * cout * cout + 2 * cout
        return total + (nf * 8 * 4 * 4 * 100 + 100) + (100 + 1)

    for size in (128, 256):
        assert n_params(VGGStyleDiscriminator(3, 64, size)) == basicsr(64, size)


def test_unet_discriminator_gives_per_pixel_logits():
    d = UNetDiscriminatorSN(channels=3, width=8)
    assert d(torch.randn(2, 3, 64, 48)).shape == (2, 1, 64, 48)
    assert UNetDiscriminatorSN(3, 8, skip=False)(torch.randn(1, 3, 16, 8)).shape == (1, 1, 16, 8)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> str:
    """A torchvision vgg19 state dict with random weights. torchvision's own `features` builder makes
    the keys; a small stand-in for the 120M-parameter classifier shows `classifier.*` is ignored."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    state = {f"features.{k}": v for k, v in make_layers(cfgs["E"]).state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 8)
    path = tmp_path_factory.mktemp("vgg") / "vgg19.pth"
    torch.save(state, path)
    return str(path)


def test_perceptual_loss_is_zero_only_for_identical_images(vgg_file):
    loss = VGGPerceptual(vgg_file)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == 0
    assert loss(x, (x + 0.1 * torch.randn_like(x)).clamp(-1, 1)).item() > 0


def test_perceptual_loss_trains_the_input_not_vgg(vgg_file):
    loss = VGGPerceptual(vgg_file)
    loss.train()
    assert not loss.training and not loss.features.training
    x = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_()
    loss(x, torch.zeros(1, 3, 32, 32)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in loss.parameters())


def test_perceptual_weights_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="loss.perceptual_weights") as e:
        VGGPerceptual(str(tmp_path / "absent.pth"))
    assert "absent.pth" in str(e.value)


@pytest.mark.parametrize("content", [{"conv.weight": torch.zeros(1)}, [1, 2], "not a tensor file"])
def test_perceptual_weights_of_the_wrong_kind_are_a_config_error(tmp_path, content):
    path = tmp_path / "bad.pth"
    if isinstance(content, str):
        path.write_text(content)
    else:
        torch.save(content, path)
    with pytest.raises(ConfigError, match="loss.perceptual_weights") as e:
        VGGPerceptual(str(path))
    assert "bad.pth" in str(e.value) and "\n" not in str(e.value)


def test_perceptual_weights_of_the_wrong_shape_are_a_config_error(tmp_path, vgg_file):
    state = torch.load(vgg_file, weights_only=True)
    state["features.0.weight"] = torch.zeros(32, 3, 3, 3)
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(ConfigError, match=r"features\.0\.weight has shape \(32, 3, 3, 3\)"):
        VGGPerceptual(str(tmp_path / "narrow.pth"))


def reference_y(rgb: np.ndarray) -> np.ndarray:
    """Y of BT.601 from (H, W, 3) uint8, written out per channel (independent of sr_metrics)."""
    r, g, b = (rgb[..., i].astype(np.float64) / 255 for i in range(3))
    return 16 + 65.481 * r + 128.553 * g + 24.966 * b


def image_pairs(n: int, size: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` (hr, sr) uint8 crops of the astronaut, sr = hr + Gaussian noise, (N, H, W, 3)."""
    rng = np.random.default_rng(seed)
    img = astronaut()
    hr = np.stack([img[y:y + size, x:x + size] for y, x in rng.integers(0, 512 - size, (n, 2))])
    sr = np.clip(hr + rng.normal(0, noise, hr.shape), 0, 255).round().astype(np.uint8)
    return hr, sr


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


# Measured largest differences from scikit-image over 180 cases (noise 1-50, border 0/2/4, sizes
# 40-96, 3 images each): PSNR 7.1e-15 dB, SSIM 1.8e-14 (float64 rounding: summation order, and
# scipy's separable Gaussian filter vs one 11x11 conv). 1e-10 leaves room for other CPUs and BLAS
# while any slip in the window, constants, Y weights or border is many orders larger.
@pytest.mark.parametrize(("noise", "border", "size"), [(3.0, 4, 64), (12.0, 0, 48), (25.0, 2, 40)])
def test_y_psnr_and_ssim_agree_with_scikit_image(noise, border, size):
    hr, sr = image_pairs(3, size, noise, seed=int(noise))
    b = slice(border, size - border)
    y_hr = [reference_y(im)[b, b] for im in hr]
    y_sr = [reference_y(im)[b, b] for im in sr]
    psnr = np.mean([peak_signal_noise_ratio(h, s, data_range=255) for h, s in zip(y_hr, y_sr, strict=True)])
    ssim = np.mean([structural_similarity(h, s, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255)
                    for h, s in zip(y_hr, y_sr, strict=True)])
    assert psnr_y(as_tensor(sr), as_tensor(hr), border) == pytest.approx(psnr, abs=1e-10)
    assert ssim_y(as_tensor(sr), as_tensor(hr), border) == pytest.approx(ssim, abs=1e-10)


def test_single_images_and_grey_images_are_measured_as_they_are():
    hr, sr = image_pairs(1, 32, 8.0, seed=1)
    t_hr, t_sr = as_tensor(hr), as_tensor(sr)
    assert psnr_y(t_sr[0], t_hr[0], 2) == psnr_y(t_sr, t_hr, 2)
    grey_hr, grey_sr = t_hr[:, :1], t_sr[:, :1]
    expected = peak_signal_noise_ratio(hr[0, ..., 0], sr[0, ..., 0], data_range=255)
    assert psnr_y(grey_sr, grey_hr, 0) == pytest.approx(expected, abs=1e-9)
    assert ssim_y(grey_hr, grey_hr, 0) == pytest.approx(1.0)
    assert psnr_y(t_hr, t_hr, 0) == float("inf")


def test_sr_metrics_refuse_float_images():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="uint8"):
        psnr_y(x, x, 0)
