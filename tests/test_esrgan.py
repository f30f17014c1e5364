"""Super-resolution (`model.arch=esrgan`): pairs, config checks, 2-process training of both stages,
exact resume across the stage boundary, `ganforge upscale` and `ganforge eval --metrics psnr,ssim`."""

from __future__ import annotations

import json
import os
import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import BIN, REPO, free_port, run_cli
from tests.test_resume import losses, run_to_end, signal_tree, start_and_wait_for_step

RECIPE = "configs/esrgan_cpu.yaml"
# 64x64 HR crops (16x16 LR) and narrow networks: a step takes a fraction of a second on a CPU
TINY = ["model.resolution=64", "model.g_width=8", "model.n_blocks=1", "model.growth=8", "model.d_width=8",
        "train.batch_size=4", "log.mlflow_uri=none", "log.every_steps=1"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """sr_photos built for 64x64 HR crops (96-pixel training patches, 64-pixel held-out ones)."""
    from data_pipeline.packaged import ensure_built

    root = str(tmp_path_factory.mktemp("sr") / "sr_photos")
    ensure_built("sr_photos", root, 64)
    return root


def data_args(root: str) -> list[str]:
    return ["data.build=", f"data.train={root}/train", f"data.val={root}/test"]


def launch(nproc: int, *args: str) -> list[str]:
    return [os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(free_port()), *(["--multi_gpu"] if nproc > 1 else []),
            "--num_processes", str(nproc), "trainer/main.py", "--config", RECIPE, *args]


def metrics(run: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def trained(photos, tmp_path_factory) -> str:
    """A 1-process run of 4 steps (2 of each stage)."""
    run = str(tmp_path_factory.mktemp("esrgan") / "R")
    r = run_cli("train", "--config", RECIPE, *data_args(photos), *TINY, f"run.dir={run}", "train.max_steps=4",
                "train.pretrain_steps=2", "checkpoint.every_steps=2", "log.sample_every_steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def test_pairs_depend_on_seed_epoch_and_sample_only(photos):
    """Each rank of a 2-rank stream gets, for each sample, the very pair the 1-rank stream makes
    of it (crop and every degradation): what a pair is does not depend on the world size."""
    from data_pipeline.degrade import Degradation
    from data_pipeline.loader import ShardStream, StreamSpec
    from trainer.families.esrgan import PairsFromImages

    pairs = PairsFromImages(Degradation(scale=4, crop=32, blur=0.5, noise=0.5, jpeg=0.5))

    def by_position(world_size: int, rank: int, epoch: int) -> dict[int, dict[str, torch.Tensor]]:
        stream = ShardStream(f"{photos}/test", StreamSpec(seed=3, rank=rank, world_size=world_size, batch_size=8,
                                                           flip=True, transform=pairs))
        stream.set_position(epoch, 0)
        out = {}
        for batch in stream:
            for i, position in enumerate(batch["position"].tolist()):
                out[position] = {"hr": batch["hr"][i], "lr": batch["lr"][i]}
        return out

    for epoch in (0, 1):
        one = by_position(1, 0, epoch)
        two = by_position(2, 0, epoch) | by_position(2, 1, epoch)
        assert len(two) > 8 and set(two) <= set(one)
        for position, pair in two.items():
            assert torch.equal(pair["hr"], one[position]["hr"]) and torch.equal(pair["lr"], one[position]["lr"])
        assert one[0]["hr"].shape == (3, 32, 32) and one[0]["lr"].shape == (3, 8, 8)
    first, second = by_position(1, 0, 0), by_position(1, 0, 1)
    assert any(not torch.equal(first[p]["hr"], second[p]["hr"]) for p in first)  # a new crop each epoch


@pytest.mark.parametrize("overrides, key, words", [
    (["model.scale=3"], "model.scale", "one of 2, 4"),
    (["model.resolution=66", "model.d_arch=unet", "model.scale=4"], "model.scale", "does not divide"),
    (["loss.perceptual_weights=/nonexistent/vgg19.pth"], "loss.perceptual_weights", "no such file"),
    (["loss.type=hinge"], "loss.type", "ragan"),
    (["model.d_arch=unet", "model.spectral_norm=true"], "model.spectral_norm", "already"),
    (["degrade.jpeg=1.5"], "degrade.jpeg", "in 0..1"),
    (["strategy=deepspeed"], "strategy", "ddp"),
])
def test_config_errors_name_the_key(overrides, key, words):
    from trainer.config import ConfigError
    from trainer.families import load_config

    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, overrides)
    assert e.value.key == key and words in str(e.value), str(e.value)


def test_ragan_is_refused_outside_esrgan():
    from trainer.config import ConfigError
    from trainer.families import load_config

    with pytest.raises(ConfigError, match="loss.type: ragan"):
        load_config("configs/dcgan_digits.yaml", ["loss.type=ragan"])


def test_missing_perceptual_weights_is_refused_before_training(photos, tmp_path):
    """The file is checked when the config loads, so nothing is built or written."""
    r = run_cli("train", "--config", RECIPE, *data_args(photos), *TINY, f"run.dir={tmp_path}/R",
                f"loss.perceptual_weights={tmp_path}/vgg19.pth")
    assert r.returncode == 2 and "loss.perceptual_weights" in r.stderr and not os.path.exists(tmp_path / "R")


def test_upscale_odd_size_gray_input_and_names(trained, tmp_path):
    """Any input size: a 50x37 PNG comes out 200x148, a grayscale JPEG comes out RGB at x4, same names."""
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(inputs / "odd.png")
    Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(inputs / "sub" / "gray.jpg")
    r = run_cli("upscale", "--run", trained, "--input", str(inputs), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "out" / "odd.png").size == (200, 148)
    gray = Image.open(tmp_path / "out" / "sub" / "gray.jpg")
    assert gray.size == (96, 80) and gray.mode == "RGB"
    same = run_cli("upscale", "--run", trained, "--input", str(inputs), "--out", str(inputs))
    assert same.returncode == 1 and "overwritten" in same.stderr
    negative = run_cli("upscale", "--run", trained, "--input", str(inputs), "--out", str(tmp_path / "neg"),
                       "--tile", "-4")
    assert negative.returncode == 2 and "config error: --tile:" in negative.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "neg")
    noise = run_cli("sample", "--run", trained, "--n", "4", "--out", str(tmp_path / "x.png"))
    assert noise.returncode == 1 and "ganforge upscale" in noise.stderr


def test_tiled_upscale_matches_the_whole_image(trained, tmp_path):
    """--tile with the default context reproduces the one-pass output of a 50x37 image."""
    from trainer.families.esrgan import load_upscaler

    net, _, _ = load_upscaler(trained)
    image = tmp_path / "in" / "odd.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(image)
    outs = {}
    for tile in (0, 16):
        r = run_cli("upscale", "--run", trained, "--input", str(image), "--out", str(tmp_path / f"t{tile}"),
                    "--tile", str(tile))
        assert r.returncode == 0, r.stderr
        outs[tile] = np.asarray(Image.open(tmp_path / f"t{tile}" / "odd.png")).astype(int)
    assert outs[0].shape == (148, 200, 3)
    assert np.abs(outs[0] - outs[16]).max() <= 1  # float rounding at the 8-bit boundary only


def test_eval_psnr_ssim_of_a_run_beside_bicubic(trained):
    r = run_cli("eval", "--run", trained, "--metrics", "psnr,ssim", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n"] == 64 and result["checkpoint"].endswith("step_00000004")
    assert 10 < result["psnr_bicubic"] < 60 and 0 < result["ssim_bicubic"] <= 1
    held_out = [m for m in metrics(trained) if "val/psnr" in m][-1]  # the same measurement, at the last step
    assert result["psnr"] == pytest.approx(held_out["val/psnr"], abs=1e-9)
    assert result["psnr_bicubic"] == pytest.approx(held_out["val/psnr_bicubic"], abs=1e-9)
    mixed = run_cli("eval", "--run", trained, "--metrics", "psnr,fid")
    assert mixed.returncode == 1 and "alone" in mixed.stderr


@pytest.mark.slow
def test_two_ranks_train_both_stages_and_resume_exactly_after_sigkill(photos, tmp_path):
    """2 processes, 20 PSNR-stage steps then 20 GAN-stage steps; a copy killed with SIGKILL before
    the stage boundary resumes from its last checkpoint, crosses the boundary, and ends with the
    uninterrupted run's losses and bit-identical G, D and G_ema."""
    common = [*data_args(photos), *TINY, "train.max_steps=40", "train.pretrain_steps=20", "checkpoint.every_steps=5",
              "log.sample_every_steps=20"]
    whole = f"{tmp_path}/whole"
    run_to_end(launch(2, *common, f"run.dir={whole}"))
    logged = metrics(whole)
    stages = [("loss/d" in m, m["step"]) for m in logged if "loss/g" in m]
    assert stages == [(step > 20, step) for step in range(1, 41)]  # D trains from step 21 on
    held_out = [m for m in logged if "val/psnr" in m]
    assert [m["step"] for m in held_out] == [20, 40] and all(m["val/psnr_bicubic"] > 20 for m in held_out)
    assert os.path.exists(f"{whole}/samples/latest.png")

    run = f"{tmp_path}/split"
    cmd = launch(2, *common, f"run.dir={run}")
    proc = start_and_wait_for_step(cmd, 12)
    signal_tree(proc, signal.SIGKILL)
    proc.wait(30)
    killed_at = max(losses(run))
    assert killed_at < 20, "killed in the PSNR stage"
    r = run_to_end(cmd)
    resumed = int(re.search(r"resuming from \S+ at step (\d+)", r.stderr).group(1))
    assert 0 < resumed <= killed_at
    assert losses(run) == losses(whole)
    a, b = (torch.load(f"{d}/checkpoints/step_00000040/state.pt", weights_only=True) for d in (whole, run))
    for net in ("G", "D", "G_ema"):
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), f"{net}.{k} differs after resume"


@pytest.mark.slow
def test_acceptance_recipe_two_ranks_then_upscale(tmp_path):
    """The recipe as written, from an empty folder: sr_photos built on first use, 2 ranks for 20 steps
    with `ganforge launch`, then a 50x37 PNG upscaled to 200x148."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    import subprocess

    r = subprocess.run([os.path.join(BIN, "ganforge"), "launch", "--config", os.path.join(REPO, RECIPE),
                        "--nproc-per-node", "2", "train.max_steps=20", "run.dir=R"],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stderr
    assert (tmp_path / "mlflow.db").exists()  # the run and its generator (LR image in) logged to MLflow
    lr_images = tmp_path / "data" / "sr_photos" / "images" / "test_lr_x4"
    assert Image.open(next(lr_images.iterdir())).size == (32, 32)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(tmp_path / "odd.png")
    u = run_cli("upscale", "--run", str(tmp_path / "R"), "--input", str(tmp_path / "odd.png"), "--out",
                str(tmp_path / "O"), cwd=str(tmp_path))
    assert u.returncode == 0, u.stderr
    assert Image.open(tmp_path / "O" / "odd.png").size == (200, 148)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_export_of_an_upscaler_reloads_and_matches(trained, tmp_path, fmt):
    """`ganforge export` writes the EMA upscaler, loads it back and compares it on LR inputs."""
    out = tmp_path / f"g.{fmt}"
    r = run_cli("export", "--run", trained, "--format", fmt, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists() and out.stat().st_size > 10_000


def test_patches_source_cuts_native_resolution_windows(tmp_path):
    """`make-shards --source patches`: size x size windows every `step` pixels plus one flush with each
    edge, pixel-for-pixel crops of the input (never resized); smaller images are left out."""
    from data_pipeline import load_index
    from data_pipeline.loader import decode_samples
    from data_pipeline.sources import patch_offsets

    assert patch_offsets(100, 48, 24) == [0, 24, 48, 52] and patch_offsets(48, 48, 24) == [0]
    assert patch_offsets(40, 48, 24) == []
    photos = tmp_path / "photos"
    photos.mkdir()
    big = np.random.default_rng(0).integers(0, 255, (70, 100, 3), dtype=np.uint8)
    Image.fromarray(big).save(photos / "big.png")
    Image.fromarray(big[:30, :30]).save(photos / "small.png")
    r = run_cli("data", "make-shards", "--source", "patches", "--input", str(photos), "--size", "48",
                "--out", str(tmp_path / "shards"))
    assert r.returncode == 0, r.stderr
    for bad, words in ((["--step", "0"], "--step must be > 0"), (["--size", "200"], "no image of at least 200x200")):
        r = run_cli("data", "make-shards", "--source", "patches", "--input", str(photos), "--size", "48", *bad,
                    "--out", str(tmp_path / "bad"))
        assert r.returncode == 1 and words in r.stderr.strip().splitlines()[-1], r.stderr
        assert not os.path.exists(tmp_path / "bad")
    index = load_index(str(tmp_path / "shards"))
    starts = [(y, x) for y in patch_offsets(70, 48, 24) for x in patch_offsets(100, 48, 24)]
    assert index.num_samples == len(starts) == 8 and index.meta["size"] == 48
    for item, (y, x) in zip(decode_samples(index, range(index.num_samples)), starts, strict=True):
        assert np.array_equal(item["image"].permute(1, 2, 0).numpy(), big[y:y + 48, x:x + 48])


def test_unet_discriminator_and_perceptual_term_train(photos, tmp_path):
    """Real-ESRGAN's combination: U-Net D with bce, and the VGG19 perceptual term from a local file
    (random weights here, in torchvision's format): the GAN stage logs every term, finite."""
    import torchvision

    weights = tmp_path / "vgg19.pth"
    torch.save(torchvision.models.vgg19(weights=None).state_dict(), weights)
    run = str(tmp_path / "R")
    r = run_cli("train", "--config", RECIPE, *data_args(photos), *TINY, f"run.dir={run}", "train.max_steps=3",
                "train.pretrain_steps=1", "model.d_arch=unet", "loss.type=bce", f"loss.perceptual_weights={weights}",
                "log.sample_every_steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    gan_steps = [m for m in metrics(run) if "loss/d" in m]
    assert [m["step"] for m in gan_steps] == [2, 3]
    for m in gan_steps:
        assert all(np.isfinite(m[k]) for k in ("loss/perceptual", "loss/g_adv", "loss/d", "loss/pixel"))
        assert m["loss/perceptual"] > 0
