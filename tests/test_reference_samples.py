"""The numbers a refactor must not change: every family's generator output after 20 steps on 2
processes, kept as arrays in tests/data/reference_samples.

Noise families: `ganforge sample --no-ema --n 16 --seed 0 --out x.npy`. Image-to-image families
(CycleGAN, pix2pix, esrgan): the raw generator on 4 fixed held-out inputs. The runs are float64
(`precision=fp64`), so that another CPU's summation order moves the results by rounding only.

Regenerate the arrays only for a deliberate change of the numbers, and say so in the commit:

    .venv/bin/python -m tests.test_reference_samples --record [--only RECIPE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STORE = os.path.join(REPO, "tests", "data", "reference_samples")
# recipe -> overrides: the recipes' own networks, on data the test builds (packaged data at 32x32)
RECIPES = {
    "dcgan_digits": [], "dcgan_digits_cond": [], "wgan_gp_digits": [], "wgan_clip_digits": [], "stylegan2_digits": [],
    "cyclegan_sample_images": ["model.resolution=32"], "pix2pix_edges": ["model.resolution=32"],
    "esrgan_cpu": ["model.resolution=32", "train.pretrain_steps=10"],
}
COMMON = ["train.max_steps=20", "precision=fp64", "log.mlflow_uri=none", "checkpoint.every_steps=20",
          "log.sample_every_steps=20", "train.batch_size=8", "data.build="]
# On another CPU (or torch) kernels sum in another order. Training and sampling here with
# ATEN_CPU_CAPABILITY=default (plain kernels instead of AVX2) moved the outputs by at most 3.6e-6
# (stylegan2_digits; 3.6e-7 or less for the GAN recipes; bench/reference_drift.py); a change of the computation moves
# outputs in [-1, 1] by orders of magnitude more.
OTHER_MACHINE_ATOL = 1e-4


def machine() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "processor": platform.processor() or platform.machine()}


def build_data(root: str) -> dict[str, list[str]]:
    """The data of each recipe, written with the project's own writers; recipe -> data overrides."""
    from data_pipeline.packaged import ensure_built
    from data_pipeline.sources import digits_source
    from data_pipeline.writer import write_shards

    src = digits_source(32)
    write_shards(src.samples, f"{root}/digits", kind=src.kind, meta=src.meta, samples_per_shard=256)
    for name in ("sample_images", "edges2photos", "sr_photos"):
        ensure_built(name, f"{root}/{name}", 32)
    data = {r: [f"data.train={root}/digits"] for r in RECIPES if "_digits" in r}
    si, ep, sr = (f"{root}/{n}" for n in ("sample_images", "edges2photos", "sr_photos"))
    data["cyclegan_sample_images"] = [f"data.train={si}/trainA", f"data.train_b={si}/trainB", f"data.val={si}/testA",
                                      f"data.val_b={si}/testB"]
    data["pix2pix_edges"] = [f"data.train={ep}/train", f"data.val={ep}/test"]
    data["esrgan_cpu"] = [f"data.train={sr}/train", f"data.val={sr}/test"]
    return data


def outputs(recipe: str, data: list[str], work: str) -> np.ndarray:
    """Train `recipe` 20 steps on 2 processes, then its generator's output (float32, as sampled)."""
    run = os.path.join(work, recipe)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    from tests.conftest import free_port

    cmd = [os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
           "trainer/main.py", "--config", f"configs/{recipe}.yaml", *COMMON, *RECIPES[recipe], *data, f"run.dir={run}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    if recipe in ("cyclegan_sample_images", "pix2pix_edges", "esrgan_cpu"):
        return image_to_image(recipe, run, data)
    out = os.path.join(work, f"{recipe}.npy")
    s = subprocess.run([os.path.join(BIN, "ganforge"), "sample", "--run", run, "--no-ema", "--n", "16", "--seed", "0",
                        "--out", out], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert s.returncode == 0, s.stderr[-3000:]
    return np.load(out)


def image_to_image(recipe: str, run: str, data: list[str]) -> np.ndarray:
    """The raw generator on the first 4 held-out inputs (esrgan: their bicubic x4 downscalings)."""
    from data_pipeline.degrade import bicubic_down
    from trainer.data import to_unit_range
    from trainer.families.image_to_image import first_images

    val = next(d.split("=", 1)[1] for d in data if d.startswith("data.val="))
    images = first_images(val, 4)
    if recipe == "esrgan_cpu":
        from trainer.families.esrgan import load_upscaler

        net, _, _ = load_upscaler(run, use_ema=False)
        source = to_unit_range(bicubic_down(images["image"], 4))
    else:
        from trainer.families.image_to_image import load_translator

        net, _ = load_translator(run, "AtoB" if recipe == "cyclegan_sample_images" else None)
        source = to_unit_range(images["image"] if "image" in images else images["a"])
    with torch.no_grad():  # float32, as `ganforge sample` writes its arrays
        return net.float()(source.float()).numpy()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reference"))
    return build_data(f"{root}/data"), root


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_outputs_equal_the_recorded_reference(recipe, fresh):
    data, work = fresh
    with open(os.path.join(STORE, "machine.json")) as f:
        recorded_on = json.load(f)
    expected = np.load(os.path.join(STORE, f"{recipe}.npy"))
    got = outputs(recipe, data[recipe], work)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if machine() == recorded_on:
        assert np.array_equal(got, expected), f"{recipe}: max |difference| {np.abs(got - expected).max():.3g}"
    else:
        assert np.abs(got - expected).max() <= OTHER_MACHINE_ATOL, f"{recipe} on {machine()}, recorded on {recorded_on}"


def record(recipes: list[str]) -> None:
    os.makedirs(STORE, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        data = build_data(f"{work}/data")
        for recipe in recipes:
            arr = outputs(recipe, data[recipe], work)
            np.save(os.path.join(STORE, f"{recipe}.npy"), arr)
            print(f"{recipe}: {arr.shape} {arr.dtype}, mean {arr.mean():.6f}", flush=True)
    with open(os.path.join(STORE, "machine.json"), "w") as f:
        json.dump(machine(), f, indent=1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="run the recipes and overwrite their stored arrays")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                        help="record only these recipes (a deliberate change of one family's numbers)")
    args = parser.parse_args()
    if args.record:
        record(args.only)
