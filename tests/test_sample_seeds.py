"""`ganforge sample` on a StyleGAN2 run the way StyleGAN2-ADA's generate.py takes it: per-seed latents
np.random.RandomState(seed).randn(1, z_dim), given latents (--z), noise modes; the default path
(--n/--seed) untouched. tests/test_sample.py covers the same options on a DCGAN run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli
from tests.test_sample import STYLEGAN2

Z_DIM = 32  # STYLEGAN2's model.z_dim


@pytest.fixture(scope="module")
def run(digits_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("seeds") / "sg2")
    r = run_cli("train", "--config", "configs/stylegan2_digits.yaml", f"data.train={digits_dir}", f"run.dir={out}",
                *STYLEGAN2, env={"WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def sample(run: str, *args: str) -> None:
    r = run_cli("sample", "--run", run, *args)
    assert r.returncode == 0, r.stderr


def test_seeds_are_the_reference_latents_one_png_each(run, tmp_path):
    from trainer.sampling import eight_bit

    z = np.concatenate([np.random.RandomState(s).randn(1, Z_DIM) for s in (2, 3)])  # generate.py's latents
    np.save(tmp_path / "z.npy", z)
    sample(run, "--z", str(tmp_path / "z.npy"), "--out", str(tmp_path / "given.npy"))
    sample(run, "--seeds", "2-3", "--out", f"{tmp_path}/pngs/")
    given = np.load(tmp_path / "given.npy")
    assert sorted(p.name for p in (tmp_path / "pngs").iterdir()) == ["seed0002.png", "seed0003.png"]
    expected = eight_bit(torch.from_numpy(given))[:, 0].numpy()  # one channel: (N, H, W)
    for k, seed in enumerate((2, 3)):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "pngs" / f"seed{seed:04d}.png")), expected[k])
    sample(run, "--seeds", "0-3", "--out", str(tmp_path / "grid.png"))
    assert Image.open(tmp_path / "grid.png").size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2 x 2, padding 2


def test_z_of_the_wrong_shape_is_one_line_naming_the_file_and_the_shape(run, tmp_path):
    np.save(tmp_path / "narrow.npy", np.zeros((4, Z_DIM - 1), np.float32))
    r = run_cli("sample", "--run", run, "--z", str(tmp_path / "narrow.npy"), "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "narrow.npy" in r.stderr and f"(N, {Z_DIM})" in r.stderr and "(4, 31)" in r.stderr
    assert not (tmp_path / "x.npy").exists()


def test_default_sampling_is_plain_g_ema_of_the_seeded_latents(run, tmp_path):
    from trainer.generate import load_generator
    from trainer.sampling import generate, latents

    sample(run, "--n", "4", "--seed", "0", "--out", str(tmp_path / "x.npy"))
    g, cfg, _ = load_generator(run)
    direct = generate(g, latents(0, 4, cfg.model.z_dim)).numpy()
    # No wrapper in the default path (truncation or another noise would move outputs by far more).
    # Not bitwise: `ganforge sample` ran in its own process, and this one may run on another thread
    # count (in-process tests set train.threads=1), which sums the convolutions in another order:
    # in the full suite the two differed by 1e-8.
    assert np.abs(np.load(tmp_path / "x.npy") - direct).max() <= 1e-6


def test_noise_modes_const_is_the_stored_maps_random_is_seeded_none_is_zero():
    from trainer.models.stylegan2 import SamplingGenerator, StyleGAN2Generator

    torch.manual_seed(0)
    g = StyleGAN2Generator(Z_DIM, Z_DIM, 2, 16, 1, 256, 16).eval()
    for block in g.blocks:  # noise that shows: the strengths start at 0
        for layer in (block.conv1, *([] if block.first else [block.conv0])):
            layer.noise_strength.data.fill_(0.5)
    z = torch.randn(3, Z_DIM)
    layers = [layer for b in g.blocks for layer in ([b.conv1] if b.first else [b.conv0, b.conv1])]
    stored = [layer.noise_const.expand(3, -1, -1, -1) for layer in layers]
    with torch.no_grad():
        const = SamplingGenerator(g, 1.0, "const")(z)
        assert torch.equal(const, g(z)) and torch.equal(const, g(z, noise=stored))
        assert torch.equal(SamplingGenerator(g, 1.0, "const")(z), const)  # deterministic
        random = SamplingGenerator(g, 1.0, "random", seed=5)(z)
        assert torch.equal(SamplingGenerator(g, 1.0, "random", seed=5)(z), random)
        assert not torch.allclose(random, const)
        assert not torch.allclose(SamplingGenerator(g, 1.0, "random", seed=6)(z), random)
        none = SamplingGenerator(g, 1.0, "none")(z)
        assert torch.equal(none, g(z, noise=[torch.zeros_like(n) for n in stored]))
