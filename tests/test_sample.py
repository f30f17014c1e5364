"""`ganforge sample` with given latents (--z), the reference's per-seed latents (--seeds) and noise modes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli

DCGAN = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16", "train.max_steps=2",
         "log.mlflow_uri=none", "train.threads=1"]
STYLEGAN2 = ["model.g_width=16", "model.d_width=16", "model.channel_base=256", "model.z_dim=32", "model.w_dim=32",
             "train.batch_size=4", "train.max_steps=1", "log.mlflow_uri=none", "train.threads=1"]


@pytest.fixture(scope="module")
def runs(digits_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sampled")
    made = {}
    for name, recipe, extra in (("dcgan", "configs/dcgan_digits.yaml", DCGAN),
                                ("stylegan2", "configs/stylegan2_digits.yaml", STYLEGAN2)):
        made[name] = str(root / name)
        r = run_cli("train", "--config", recipe, f"data.train={digits_dir}", f"run.dir={made[name]}", *extra,
                    env={"WORLD_SIZE": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
    return made


def sample(run: str, *args: str) -> np.ndarray:
    r = run_cli("sample", "--run", run, *args)
    assert r.returncode == 0, r.stderr
    return np.load(args[args.index("--out") + 1]) if "--out" in args and args[args.index("--out") + 1].endswith(".npy") \
        else None


def test_seeds_give_the_reference_latents_and_one_8_bit_png_each(runs, tmp_path):
    z = np.concatenate([np.random.RandomState(s).randn(1, 16) for s in (3, 4, 5)])  # StyleGAN2-ADA's convention
    np.save(tmp_path / "z.npy", z)
    raw = sample(runs["dcgan"], "--z", str(tmp_path / "z.npy"), "--out", str(tmp_path / "raw.npy"))
    assert raw.shape == (3, 1, 32, 32)
    out = tmp_path / "pngs"
    sample(runs["dcgan"], "--seeds", "3-5", "--out", f"{out}/")
    assert sorted(p.name for p in out.iterdir()) == ["seed0003.png", "seed0004.png", "seed0005.png"]
    for k, seed in enumerate((3, 4, 5)):
        png = np.asarray(Image.open(out / f"seed{seed:04d}.png"))
        assert png.dtype == np.uint8 and png.shape == (32, 32)
        assert np.array_equal(png, np.clip(raw[k, 0] * 127.5 + 128, 0, 255).astype(np.uint8))
    again = sample(runs["dcgan"], "--seeds", "3,4-5", "--out", str(tmp_path / "again.npy"))
    assert np.array_equal(again, raw)  # the same latents whichever way the seeds are written


def test_bad_latent_files_and_options_are_one_line_naming_what_is_wrong(runs, tmp_path):
    np.save(tmp_path / "wide.npy", np.zeros((2, 17), np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [(["--z", str(tmp_path / "wide.npy")], "(N, 16)"),
             (["--z", str(tmp_path / "objects.npy")], "objects.npy"),
             (["--seeds", "a-b"], "--seeds"),
             (["--noise-mode", "random"], "--noise-mode")]
    for args, named in cases:
        out = tmp_path / "x.npy"
        r = run_cli("sample", "--run", runs["dcgan"], *args, "--out", str(out))
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and named in r.stderr, r.stderr
        assert not out.exists()
    r = run_cli("sample", "--run", runs["dcgan"], "--z", str(tmp_path / "wide.npy"), "--seeds", "1",
                "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 2 and "not allowed with" in r.stderr


def test_stylegan2_noise_modes(runs, tmp_path):
    def draw(*args: str) -> np.ndarray:
        return sample(runs["stylegan2"], "--seeds", "0-3", *args, "--out", str(tmp_path / "s.npy"))

    const = draw()
    assert np.array_equal(draw("--noise-mode", "const"), const)  # the default: the stored maps
    random = draw("--noise-mode", "random")
    assert np.array_equal(draw("--noise-mode", "random"), random)  # drawn from --seed: reproducible
    assert not np.array_equal(draw("--noise-mode", "random", "--seed", "1"), random)
    none = draw("--noise-mode", "none")
    assert not np.allclose(random, const) and not np.allclose(none, const) and not np.allclose(none, random)
    truncated = draw("--truncation", "0.5", "--noise-mode", "none")
    assert truncated.shape == none.shape and not np.allclose(truncated, none)
