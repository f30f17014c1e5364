"""model.pack (PacGAN): D judges packs of k samples formed from global positions, whatever the world size."""

from __future__ import annotations

import copy
import json
import os
import re
import signal

import numpy as np
import pytest
import torch

from tests.conftest import accelerate_cpu, run_cli
from tests.test_training import assert_two_equal_one
from trainer.config import ConfigError
from trainer.families import load_config
from trainer.packing import pack

RECIPE = "configs/dcgan_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16", "log.mlflow_uri=none"]


# -- what D is shown ---------------------------------------------------------------------------
def test_pack_concatenates_rows_n_over_k_apart_along_channels_features_and_labels():
    images = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 2, 2)  # every value of row i is i
    packed = pack(images, 2)
    assert packed.shape == (4, 6, 2, 2)
    assert packed[:, :3, 0, 0].tolist() == [[0.0] * 3, [1.0] * 3, [2.0] * 3, [3.0] * 3]
    assert packed[:, 3:, 0, 0].tolist() == [[4.0] * 3, [5.0] * 3, [6.0] * 3, [7.0] * 3]
    points = torch.arange(12.0).view(6, 2)
    assert pack(points, 3).tolist() == [[0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]]
    assert pack(torch.tensor([5, 6, 7, 8]), 2).tolist() == [[5, 7], [6, 8]]
    assert pack(points, 1) is points and pack(None, 2) is None
    with pytest.raises(ValueError, match="packs of 4"):
        pack(points, 4)


def rank_batches(digits_dir: str, world_size: int, batch: int, steps: int) -> list[list[torch.Tensor]]:
    """Each rank's first `steps` batches of real images, read by the real data cursor as rank r of W."""
    from trainer.data import DataCursor
    from trainer.distributed import DistEnv

    cfg = load_config(RECIPE, [f"data.train={digits_dir}", "run.dir=unused", f"train.batch_size={batch}"])
    out = []
    for r in range(world_size):
        cursor = DataCursor(digits_dir, cfg, DistEnv(r, world_size, r, torch.device("cpu")))
        out.append([cursor.next()["image"] for _ in range(steps)])
    return out


@pytest.mark.parametrize("accumulate", [1, 2])
def test_packs_hold_the_same_samples_and_latents_whatever_the_world_size(digits_dir, accumulate):
    """The packs D sees, gathered over all ranks, are the same for 1, 2 and 4 ranks: same real
    images, same latents, grouped the same way; and (with accumulation) in the same micro-batch."""
    from trainer.core import global_draw
    from trainer.distributed import DistEnv

    batch, k, steps = 16, 2, 2

    def packs(world_size: int) -> list[set[bytes]]:
        """Per (step, micro-batch): the set of packs over all ranks, each pack as its bytes."""
        images = rank_batches(digits_dir, world_size, batch, steps)
        found: list[set[bytes]] = []
        for step in range(steps):
            for m in range(accumulate):
                group = set()
                for r in range(world_size):
                    z = global_draw(step, (batch, 4), DistEnv(r, world_size, r, torch.device("cpu")))
                    part = slice(m * len(z) // accumulate, (m + 1) * len(z) // accumulate)
                    x = pack(images[r][step][part].float(), k)
                    zs = pack(z[part], k)
                    assert x.shape[1] == k and zs.shape[1] == 4 * k
                    group |= {x[i].numpy().tobytes() + zs[i].numpy().tobytes() for i in range(len(x))}
                found.append(group)
        return found

    one = packs(1)
    assert all(len(g) == batch // accumulate // k for g in one)
    assert packs(2) == one and packs(4) == one


def test_a_pack_is_the_global_positions_q_and_q_plus_batch_over_k(digits_dir):
    """With 2 ranks, the pack rank 1 shows D first holds global positions 1 and 1 + 16/2 = 9."""
    whole = rank_batches(digits_dir, 1, 16, 1)[0][0]
    rank1 = rank_batches(digits_dir, 2, 16, 1)[1][0]
    first = pack(rank1, 2)[0]
    assert torch.equal(first[:1], whole[1]) and torch.equal(first[1:], whole[9])


def make_trainer(digits_dir: str, tmp_path, *overrides: str):
    from trainer.distributed import init_distributed
    from trainer.families.gan import GANTrainer

    cfg = load_config(RECIPE, [f"data.train={digits_dir}", f"run.dir={tmp_path}/run", *TINY, "model.norm=none",
                               *overrides])
    return GANTrainer(cfg, init_distributed())


@pytest.fixture()
def single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


def test_d_step_shows_d_the_packs_and_takes_r1_on_the_packed_reals(digits_dir, tmp_path, single_process):
    t = make_trainer(digits_dir, tmp_path, "model.pack=2", "loss.r1_gamma=1.0")
    d, g = copy.deepcopy(t.D.module), copy.deepcopy(t.G.module)  # as they are before the update
    real, z = torch.rand(16, 1, 32, 32) * 2 - 1, torch.randn(16, 16)
    stats = t.d_step(real, z, r1=True)
    x = pack(real, 2).requires_grad_(True)
    real_out = d(x)
    assert real_out.shape == (8,)
    (grad,) = torch.autograd.grad(real_out.sum(), x)
    assert float(stats["d/real"]) == pytest.approx(float(real_out.detach().mean()), rel=1e-5)
    assert float(stats["d/fake"]) == pytest.approx(float(d(pack(g(z), 2)).detach().mean()), rel=1e-5)
    assert float(stats["loss/r1"]) == pytest.approx(float(grad.flatten(1).pow(2).sum(1).mean()), rel=1e-4)


def test_gradient_penalty_interpolates_packs_with_the_draw_of_their_first_sample(digits_dir, tmp_path,
                                                                                 single_process):
    from trainer.objectives import gradient_penalty

    t = make_trainer(digits_dir, tmp_path, "model.pack=2", "loss.type=wgan_gp")
    with torch.no_grad():  # a critic far from 1-Lipschitz, so that the penalty depends on where it is taken
        for p in t.D.module.parameters():
            p.mul_(4)
    d, g = copy.deepcopy(t.D.module), copy.deepcopy(t.G.module)
    real, z, eps = torch.rand(16, 1, 32, 32) * 2 - 1, torch.randn(16, 16), torch.rand(16)
    stats = t.d_step(real, z, eps)
    with torch.no_grad():
        fake = pack(g(z), 2)
    expected = gradient_penalty(d, pack(real, 2), fake, eps[:8])
    other = gradient_penalty(d, pack(real, 2), fake, eps[8:])  # the second members' draws
    assert float(stats["loss/gp"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(stats["loss/gp"]) != pytest.approx(float(other), rel=1e-3)


def test_g_step_judges_its_samples_in_packs(digits_dir, tmp_path, single_process):
    t = make_trainer(digits_dir, tmp_path, "model.pack=4")
    d, g = copy.deepcopy(t.D.module), copy.deepcopy(t.G.module)
    z = torch.randn(16, 16)
    stats = t.g_step(z)
    assert float(stats["loss/g"]) == pytest.approx(float(torch.nn.functional.softplus(-d(pack(g(z), 4))).mean()),
                                                  rel=1e-5)


def test_conditional_d_projects_a_pack_on_the_sum_of_its_members_label_embeddings():
    from trainer.config import ModelConfig
    from trainer.models import build_models

    torch.manual_seed(0)
    _, d = build_models(ModelConfig(d_width=8, num_classes=5, norm="none", pack=2))
    d.embed.weight.data.normal_()  # large enough to matter
    x = torch.randn(3, 2, 32, 32)
    y0, y1 = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 0])
    head = 2 * d(x, y1) - d(x, torch.stack([y1, y1], dim=1))  # D(x) without the projection term
    joint = d(x, torch.stack([y0, y1], dim=1))
    torch.testing.assert_close(joint, d(x, y0) + d(x, y1) - head)
    assert not torch.allclose(joint, d(x, y0))


def test_pack_one_builds_the_same_networks_as_before():
    from trainer.config import ModelConfig
    from trainer.models import build_models

    for arch, channels, first in (("dcgan", 3, "features.0.weight"), ("mlp", 2, "net.0.weight")):
        shapes = []
        for k in (1, 2):
            torch.manual_seed(0)
            shapes.append(build_models(ModelConfig(arch=arch, channels=channels, pack=k))[1].state_dict()[first].shape)
        assert shapes[0][1] == channels and shapes[1][1] == 2 * channels, arch


# -- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,world_size,words", [
    (["model.pack=3"], 1, "per-rank batch of 16 samples"),
    (["model.pack=16"], 2, "per-rank batch of 8 samples"),
    (["model.pack=8", "train.accumulate=4"], 1, "per-rank batch of 4 samples"),
    (["model.pack=0"], 1, ">= 1"),
    (["model.pack=2", "model.arch=stylegan2", "model.resolution=16"], 1, "not stylegan2"),
])
def test_packs_that_do_not_fit_are_refused_naming_model_pack(digits_dir, overrides, world_size, words):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [f"data.train={digits_dir}", "run.dir=unused", *TINY, *overrides], world_size=world_size)
    assert e.value.key == "model.pack" and words in str(e.value)


def test_train_with_an_unfit_pack_exits_2_naming_the_key(digits_dir, tmp_path):
    r = run_cli("train", "--config", "configs/cyclegan_sample_images.yaml", f"run.dir={tmp_path}/run",
                "model.pack=2", env={"WORLD_SIZE": "1"})
    assert r.returncode == 2 and "model.pack" in r.stderr and "cyclegan" in r.stderr, r.stderr[-2000:]


def test_checkpoints_from_before_model_pack_still_resume_and_a_changed_pack_is_refused():
    from trainer.checkpoint import CheckpointError
    from trainer.config import Config, to_dict
    from trainer.core import check_compatible

    now = to_dict(Config())
    older = copy.deepcopy(now)
    del older["model"]["pack"]
    check_compatible(older, now, "ckpt")  # a checkpoint written before the key existed
    packed = copy.deepcopy(now)
    packed["model"]["pack"] = 2
    with pytest.raises(CheckpointError, match=r"model\.pack \(2 in checkpoint, 1 now\)"):
        check_compatible(packed, now, "ckpt")


# -- training ------------------------------------------------------------------------------------
def metrics(run) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def test_an_image_recipe_trains_with_pack_2_and_samples(digits_dir, tmp_path):
    from trainer.checkpoint import read_checkpoint

    run = tmp_path / "run"
    r = run_cli("train", "--config", "configs/dcgan_digits_cond.yaml", f"data.train={digits_dir}", f"run.dir={run}",
                *TINY, "model.pack=2", "train.max_steps=3", "log.every_steps=1", env={"WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    logs = metrics(run)
    assert [rec["step"] for rec in logs] == [1, 2, 3]
    assert all(np.isfinite(rec["loss/d"]) and np.isfinite(rec["loss/g"]) for rec in logs)
    state = read_checkpoint(str(run / "checkpoints" / "step_00000003"))
    assert state["D"]["features.0.weight"].shape[1] == 2  # one gray channel per pack member
    out = tmp_path / "s.npy"
    assert run_cli("sample", "--run", str(run), "--n", "4", "--seed", "0", "--out", str(out)).returncode == 0
    assert np.load(out).shape == (4, 1, 32, 32)


@pytest.mark.parametrize("recipe,mixture", [("configs/gan_ring8.yaml", "ring8"),
                                            ("configs/wgan_gp_grid25.yaml", "grid25")])
def test_a_point_recipe_trains_with_pack_2_and_is_evaluated_on_modes(tmp_path, recipe, mixture):
    from trainer.checkpoint import read_checkpoint

    data, run = tmp_path / mixture, tmp_path / "run"
    r = run_cli("data", "make-shards", "--source", "gaussians", "--mixture", mixture, "--n", "512", "--out", str(data))
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--config", recipe, f"data.train={data}", f"run.dir={run}", "model.pack=2",
                "train.max_steps=4", "train.batch_size=64", "log.every_steps=1", "eval.every_steps=4",
                "eval.metrics=modes", "eval.n=500", "log.mlflow_uri=none", env={"WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    logs = metrics(run)
    assert all(np.isfinite(rec["loss/d"]) for rec in logs if "loss/d" in rec)
    evals = [rec for rec in logs if "eval/modes_total" in rec]
    assert len(evals) == 1 and 0 <= evals[0]["eval/high_quality"] <= 1
    state = read_checkpoint(str(run / "checkpoints" / "step_00000004"))
    assert state["D"]["net.0.weight"].shape[1] == 4  # two 2-D points per pack


# -- distributed ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("recipe,extra", [
    ("configs/wgan_gp_digits.yaml", []),  # gradient penalty on packs
    ("configs/dcgan_digits_cond.yaml", ["model.norm=none", "loss.r1_gamma=1.0", "loss.r1_every=2"]),  # labels, R1
])
def test_two_processes_with_pack_2_equal_one_process(digits_dir, tmp_path, recipe, extra):
    """Same bounds as tests/test_training.py's 1-vs-2-process tests (BN-free D: per-rank batch
    statistics differ by construction)."""
    common = ["--config", recipe, f"data.train={digits_dir}", *TINY, "model.pack=2", "train.max_steps=10",
              "log.every_steps=1", *extra]
    r = accelerate_cpu(2, *common, f"run.dir={tmp_path}/two")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("train", *common, f"run.dir={tmp_path}/one", env={"WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert_two_equal_one(tmp_path)  # the bounds of the other 1-vs-2-process tests


@pytest.mark.slow
def test_two_processes_with_pack_2_resume_bitwise_after_sigkill(digits_dir, tmp_path):
    from tests.test_resume import (
        launch_cmd,
        losses,
        run_to_end,
        signal_tree,
        start_and_wait_for_step,
    )
    from trainer.checkpoint import read_checkpoint

    steps = 30
    reference, run = str(tmp_path / "reference"), str(tmp_path / "run")
    run_to_end(launch_cmd(2, digits_dir, reference, "model.pack=2", f"train.max_steps={steps}"))
    cmd = launch_cmd(2, digits_dir, run, "model.pack=2", f"train.max_steps={steps}")
    proc = start_and_wait_for_step(cmd, 12)
    signal_tree(proc, signal.SIGKILL)
    proc.wait(30)
    killed_at = max(losses(run))
    assert 12 <= killed_at < steps, "the job must be killed mid-run"
    r = run_to_end(cmd)
    resumed_from = int(re.search(r"resuming from \S+ at step (\d+)", r.stdout + r.stderr).group(1))
    assert 0 < resumed_from <= killed_at
    assert losses(run) == losses(reference), "losses differ after resume"
    ref, got = (read_checkpoint(os.path.join(p, "checkpoints", f"step_{steps:08d}")) for p in (reference, run))
    assert ref["D"]["features.0.weight"].shape[1] == 2
    for net in ("G", "D", "G_ema"):
        for k, v in ref[net].items():
            assert torch.equal(v, got[net][k]), f"{net}.{k} differs after resume"


@pytest.mark.slow
def test_pack_2_resumes_exactly_on_another_world_size(digits_dir, tmp_path):
    """Elastic: 2 ranks then 1 sees the same packs as 1 rank throughout (float64, as in test_resume.py)."""
    from tests.test_resume import launch_cmd, losses, run_to_end
    from trainer.checkpoint import read_checkpoint

    exact = ["model.norm=none", "precision=fp64", "model.pack=2"]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    run_to_end(launch_cmd(1, digits_dir, whole, *exact, "train.max_steps=10"))
    run_to_end(launch_cmd(2, digits_dir, split, *exact, "train.max_steps=5"))
    run_to_end(launch_cmd(1, digits_dir, split, *exact, "train.max_steps=10"))
    first = losses(whole)[6], losses(split)[6]
    assert first[1] == pytest.approx(first[0], rel=1e-4, abs=1e-6)
    a, b = (read_checkpoint(os.path.join(p, "checkpoints", "step_00000010")) for p in (whole, split))
    for net in ("G", "D"):
        for k, v in a[net].items():
            assert (b[net][k] - v).norm() <= 1e-9 * v.norm() + 1e-12, f"{net}.{k}"


@pytest.mark.slow
def test_deepspeed_zero2_with_pack_2_trains_the_same_weights_as_ddp(digits_dir, tmp_path):
    from tests.test_deepspeed import RECIPE as GP_RECIPE
    from tests.test_deepspeed import TINY as DS_TINY
    from tests.test_deepspeed import assert_same_networks, launch, weights

    common = ["--config", GP_RECIPE, f"data.train={digits_dir}", *DS_TINY, "model.pack=2", "train.max_steps=3",
              "checkpoint.every_steps=3"]
    launch(*common, f"run.dir={tmp_path}/ddp")
    launch(*common, f"run.dir={tmp_path}/zero2", "strategy=deepspeed", "deepspeed.zero_stage=2")
    a, b = weights(str(tmp_path / "ddp"), 3), weights(str(tmp_path / "zero2"), 3)
    assert b["strategy"] == "deepspeed" and a["D"]["features.0.weight"].shape[1] == 2
    assert_same_networks(a, b, rel=1e-5)
