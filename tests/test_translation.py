"""CycleGAN and pix2pix: packaged data, DDP agreement, exact resume, translate, and learning."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import BIN, REPO, accelerate_cpu, free_port, run_cli

CYCLE = os.path.join(REPO, "configs", "cyclegan_sample_images.yaml")
PIX = os.path.join(REPO, "configs", "pix2pix_edges.yaml")
TINY = ["model.resolution=32", "model.g_width=8", "model.d_width=8", "model.n_blocks=1", "model.d_layers=2",
        "log.mlflow_uri=none", "train.threads=1"]


def cycle_data(root: str) -> list[str]:
    return ["data.build=", f"data.train={root}/trainA", f"data.train_b={root}/trainB",
            f"data.val={root}/testA", f"data.val_b={root}/testB"]


def pix_data(root: str) -> list[str]:
    return ["data.build=", f"data.train={root}/train", f"data.val={root}/test"]


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_image_pool_keeps_at_most_its_size_and_returns_real_history():
    from trainer.families.cyclegan import ImagePool

    pool = ImagePool(3)
    seen = []
    for step in range(6):
        batch = torch.full((2, 1, 2, 2), float(step))
        out = pool.query(batch, seed=step)
        seen += [float(x) for x in out[:, 0, 0, 0]]
        assert len(pool.images) <= 3 and out.shape == batch.shape
        # every returned image is one generated at this step or earlier, never something else
        assert all(v <= step for v in out[:, 0, 0, 0].tolist())
    assert len(pool.images) == 3
    assert any(v < 5 for v in seen[-4:]), "a full pool should hand back some older images"
    again = ImagePool(3)
    for step in range(6):
        again.query(torch.full((2, 1, 2, 2), float(step)), seed=step)
    assert [float(x[0, 0, 0]) for x in again.images] == [float(x[0, 0, 0]) for x in pool.images]


def test_packaged_build_is_complete_deterministic_and_refuses_partial_dirs(packaged, tmp_path):
    from data_pipeline import DataError, load_index
    from data_pipeline.packaged import ensure_built

    for split in ("trainA", "trainB", "testA", "testB"):
        index = load_index(os.path.join(packaged["si"], split))
        assert index.kind == "image" and index.meta["size"] == 32 and index.num_samples > 0
    pairs = load_index(os.path.join(packaged["ep"], "train"))
    assert pairs.kind == "paired" and pairs.num_samples >= 1000
    assert len(os.listdir(os.path.join(packaged["ep"], "images", "test"))) == load_index(
        os.path.join(packaged["ep"], "test")).num_samples
    assert ensure_built("sample_images", packaged["si"], 32) is False  # already there: nothing rebuilt
    rebuilt = tmp_path / "again"
    ensure_built("sample_images", str(rebuilt), 32)
    assert load_index(str(rebuilt / "trainA")).fingerprint() == load_index(os.path.join(packaged["si"], "trainA")).fingerprint()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "something").write_text("x")
    with pytest.raises(DataError, match="not a complete"):
        ensure_built("sample_images", str(partial), 32)
    assert (partial / "something").read_text() == "x"  # nothing already there is touched


def test_translation_configs_reject_what_cannot_work(packaged, tmp_path):
    bad = [
        (["data.train_b="], "data.train_b"),
        (["loss.type=wgan_gp"], "loss.type"),
        (["train.n_critic=2"], "train.n_critic"),
        (["model.resolution=30"], "model.resolution"),
        ([f"data.train_b={packaged['ep']}/train"], "data.train_b"),  # paired shards are not a domain
    ]
    for extra, key in bad:
        r = run_cli("train", "--config", CYCLE, *cycle_data(packaged["si"]), *TINY, f"run.dir={tmp_path}/r", *extra)
        assert r.returncode == 2, (extra, r.stderr)
        assert key in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run_cli("train", "--config", PIX, *TINY, f"data.train={packaged['si']}/trainA", "data.build=", "data.val=",
                f"run.dir={tmp_path}/p")
    assert r.returncode == 2 and "paired" in r.stderr


@pytest.mark.slow
def test_cyclegan_ranks_hold_identical_networks(packaged, tmp_path):
    """All four networks (G_AB, G_BA, D_A, D_B) agree on both ranks after real 2-process steps."""
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
           "tests/ddp_probe.py", str(tmp_path), *cycle_data(packaged["si"]), *TINY, "train.batch_size=4",
           "loss.identity_weight=0.5"]  # the identity term too (the CPU recipe leaves it out)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PROBE_CONFIG=CYCLE, PROBE_STEPS="4")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert ranks[0]["world_size"] == 2
    for net in ("G", "D"):
        names = {k.split(".")[0] for k in ranks[0][net]}
        assert names == ({"g_ab", "g_ba"} if net == "G" else {"d_a", "d_b"})
        for k, v in ranks[0][net].items():
            assert torch.equal(v, ranks[1][net][k]), f"{net}.{k} differs between ranks"
    assert any(not torch.equal(v, ranks[0]["G_init"][k]) for k, v in ranks[0]["G"].items())
    assert set(ranks[0]["positions"]).isdisjoint(ranks[1]["positions"])  # each rank reads its own samples


@pytest.mark.slow
def test_cyclegan_resume_restores_pools_and_both_data_positions(packaged, tmp_path):
    """Stopping at step 3 and resuming gives exactly the weights of an uninterrupted 6-step run
    (2 processes): both streams' positions and each rank's image pool came back."""
    common = [*cycle_data(packaged["si"]), *TINY, "train.batch_size=4", "train.pool_size=3",
              "train.lr_decay_start=1.0", "checkpoint.every_steps=3", "log.every_steps=1"]
    whole = accelerate_cpu(2, "--config", CYCLE, *common, f"run.dir={tmp_path}/whole", "train.max_steps=6")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = accelerate_cpu(2, "--config", CYCLE, *common, f"run.dir={tmp_path}/split", "train.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    saved = torch.load(tmp_path / "split/checkpoints/step_00000003/state.pt", weights_only=True)
    assert len(saved["pools"]) == 2 and all(len(p["a"]) == 3 and len(p["b"]) == 3 for p in saved["pools"])
    assert not torch.equal(saved["pools"][0]["a"], saved["pools"][1]["a"])  # each rank keeps its own history
    assert saved["data"]["consumed"] == 12 and saved["data_b"]["consumed"] == 12
    second = accelerate_cpu(2, "--config", CYCLE, *common, f"run.dir={tmp_path}/split", "train.max_steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr
    a = torch.load(tmp_path / "whole/checkpoints/step_00000006/state.pt", weights_only=True)
    b = torch.load(tmp_path / "split/checkpoints/step_00000006/state.pt", weights_only=True)
    for net in ("G", "D"):
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), f"{net}.{k} differs after resume"
    for p, q in zip(a["pools"], b["pools"], strict=True):
        assert torch.equal(p["a"], q["a"]) and torch.equal(p["b"], q["b"])
    losses = [[m["loss/d"] for m in metrics(tmp_path / d) if "loss/d" in m][-3:] for d in ("whole", "split")]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_cyclegan_acceptance_builds_data_trains_two_ranks_and_translates(tmp_path):
    """The recipe as written, from an empty folder: packaged data built on first use, 2 ranks,
    then `ganforge translate` writes one image per input at the input's size."""
    full_env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2",
           os.path.join(REPO, "trainer", "main.py"), "--config", CYCLE, "train.max_steps=20", "run.dir=R",
           "log.mlflow_uri=none"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=full_env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stderr
    inputs = tmp_path / "data" / "sample_images" / "images" / "testA"
    assert len(os.listdir(inputs)) > 0
    grid = Image.open(tmp_path / "R" / "samples" / "latest.png")
    # 8 held-out rows of six 64x64 tiles (A, A->B, A->B->A, B, B->A, B->A->B), 2-pixel padding
    assert grid.size == (6 * 66 + 2, 8 * 66 + 2)
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(odd / "photo.jpg")
    for source, out in ((inputs, tmp_path / "out"), (odd / "photo.jpg", tmp_path / "out_odd")):
        t = run_cli("translate", "--run", str(tmp_path / "R"), "--direction", "AtoB", "--input", str(source),
                    "--out", str(out), cwd=str(tmp_path))
        assert t.returncode == 0, t.stderr
    for name in os.listdir(inputs):
        assert Image.open(tmp_path / "out" / name).size == Image.open(inputs / name).size
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(inputs))
    assert Image.open(tmp_path / "out_odd" / "photo.jpg").size == (50, 37)
    s = run_cli("sample", "--run", str(tmp_path / "R"), "--n", "4", "--out", str(tmp_path / "x.png"))
    assert s.returncode == 1 and "translate" in s.stderr


@pytest.mark.slow
def test_pix2pix_two_ranks_train_log_held_out_l1_and_translate(packaged, tmp_path):
    r = accelerate_cpu(2, "--config", PIX, *pix_data(packaged["ep"]), *TINY, f"run.dir={tmp_path}/R",
                       "train.max_steps=20", "log.sample_every_steps=10", "train.batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    held_out = [m for m in metrics(tmp_path / "R") if "val/l1" in m]
    assert [m["step"] for m in held_out] == [10, 20]
    assert all(0 < m["val/l1"] < 2 and m["val/psnr"] > 0 for m in held_out)
    inputs = os.path.join(packaged["ep"], "images", "test")
    t = run_cli("translate", "--run", str(tmp_path / "R"), "--direction", "AtoB", "--input", inputs,
                "--out", str(tmp_path / "out"))
    assert t.returncode == 0, t.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(inputs))
    back = run_cli("translate", "--run", str(tmp_path / "R"), "--direction", "BtoA", "--input", inputs,
                   "--out", str(tmp_path / "back"))
    assert back.returncode == 1 and "one way" in back.stderr and not os.path.exists(tmp_path / "back")


@pytest.mark.slow
def test_cycle_and_l1_losses_fall_over_a_short_cpu_run(packaged, tmp_path):
    """Learning, not just running: the cycle loss (CycleGAN) and the held-out L1 (pix2pix) drop."""
    r = run_cli("train", "--config", CYCLE, *cycle_data(packaged["si"]), *TINY, f"run.dir={tmp_path}/c",
                "train.max_steps=80", "log.every_steps=1", "log.sample_every_steps=1000")
    assert r.returncode == 0, r.stderr[-3000:]
    cycle = [m["loss/cycle"] for m in metrics(tmp_path / "c") if "loss/cycle" in m]
    assert np.mean(cycle[-5:]) < 0.8 * np.mean(cycle[:5]), cycle
    r = run_cli("train", "--config", PIX, *pix_data(packaged["ep"]), *TINY, f"run.dir={tmp_path}/p",
                "train.max_steps=80", "log.every_steps=10", "log.sample_every_steps=40")
    assert r.returncode == 0, r.stderr[-3000:]
    l1 = [m["val/l1"] for m in metrics(tmp_path / "p") if "val/l1" in m]
    assert l1[-1] < l1[0], l1


def test_translate_refuses_noise_runs_and_missing_input(tmp_path, digits_dir):
    r = run_cli("train", "--config", "configs/dcgan_digits.yaml", f"data.train={digits_dir}", f"run.dir={tmp_path}/g",
                "train.max_steps=2", "model.g_width=8", "model.d_width=8", "log.mlflow_uri=none")
    assert r.returncode == 0, r.stderr
    t = run_cli("translate", "--run", str(tmp_path / "g"), "--input", str(tmp_path), "--out", str(tmp_path / "o"))
    assert t.returncode == 1 and "ganforge sample" in t.stderr
