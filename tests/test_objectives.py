"""The training core: objectives, penalties, phases, precision and recipes."""

from __future__ import annotations

import copy
import glob
import os

import pytest
import torch
from torch import nn

from trainer.families import load_config
from trainer.objectives import d_loss, g_loss, gradient_penalty, r1_penalty


def test_logit_losses_match_their_textbook_forms():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    bce = nn.functional.binary_cross_entropy_with_logits
    torch.testing.assert_close(d_loss("bce", real, fake),
                               bce(real, torch.ones(2)) + bce(fake, torch.zeros(2)))
    torch.testing.assert_close(g_loss("bce", fake), bce(fake, torch.ones(2)))
    torch.testing.assert_close(d_loss("hinge", real, fake), torch.tensor((0 + 2 + 1.5 + 0) / 2))
    torch.testing.assert_close(d_loss("wgan", real, fake), fake.mean() - real.mean())
    torch.testing.assert_close(d_loss("lsgan", real, fake),
                               0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake**2).mean())


def test_gradient_penalty_and_r1_of_a_linear_critic_are_exact():
    w = torch.tensor([3.0, 4.0])  # |w| = 5: the gradient of x -> w.x everywhere
    critic = nn.Linear(2, 1, bias=False)
    critic.weight.data = w.view(1, 2)
    d = lambda x, labels=None: critic(x).flatten()  # noqa: E731
    real, fake = torch.randn(8, 2), torch.randn(8, 2)
    torch.testing.assert_close(gradient_penalty(d, real, fake, torch.rand(8)), torch.tensor(16.0))
    x = real.clone().requires_grad_(True)
    torch.testing.assert_close(r1_penalty(d(x), x), torch.tensor(25.0))


@pytest.fixture()
def make_trainer(digits_dir, tmp_path, monkeypatch):
    from trainer.distributed import init_distributed
    from trainer.families.gan import GANTrainer

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def make(recipe: str = "configs/dcgan_digits.yaml", *overrides: str) -> GANTrainer:
        cfg = load_config(recipe, [f"data.train={digits_dir}", f"run.dir={tmp_path}/run", "log.mlflow_uri=none",
                                   "model.g_width=8", "model.d_width=8", "model.z_dim=16",
                                   "train.batch_size=16", *overrides])
        return GANTrainer(cfg, init_distributed())

    return make


def test_weight_clipping_bounds_hold(make_trainer):
    t = make_trainer("configs/wgan_clip_digits.yaml", "train.lr_d=0.05")
    for _ in range(3):
        t.train_step()
    assert isinstance(t.D.opt, torch.optim.RMSprop)
    params = torch.cat([p.flatten() for p in t.D.module.parameters()])
    assert params.abs().max() <= 0.01 and params.abs().max() > 0.009  # clipped, and the bound is reached


def test_gradient_accumulation_equals_the_full_batch(make_trainer):
    a = make_trainer("configs/wgan_gp_digits.yaml")
    b = make_trainer("configs/wgan_gp_digits.yaml", "train.accumulate=4")
    real, z, eps = torch.rand(16, 1, 32, 32) * 2 - 1, torch.randn(16, 16), torch.rand(16)
    a.d_step(real, z, eps)
    b.d_step(real, z, eps)
    for p, q in zip(a.D.module.parameters(), b.D.module.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_nonfinite_step_is_skipped_and_repeated_ones_abort(make_trainer):
    from trainer.core import TrainingError

    t = make_trainer("configs/dcgan_digits.yaml", "train.max_nonfinite=3")
    assert t.D.opt.defaults["fused"]  # the skip is decided on the device, by the fused kernel
    t.d_step(torch.rand(16, 1, 32, 32), torch.randn(16, 16))  # a good step: Adam has moments and a count
    before = [p.clone() for p in t.D.module.parameters()]
    moments = copy.deepcopy(t.D.opt.state_dict()["state"])
    stats = t.d_step(torch.full((16, 1, 32, 32), float("nan")), torch.randn(16, 16))
    assert stats["skipped/d"] == 1 and not torch.isfinite(stats["grad_norm/d"])
    assert all(torch.equal(a, b) for a, b in zip(before, t.D.module.parameters(), strict=True))
    after = t.D.opt.state_dict()["state"]
    assert all(torch.equal(moments[i][k], after[i][k]) for i in moments for k in ("step", "exp_avg", "exp_avg_sq"))
    steps = [True, False, True, True]  # a good step resets the run
    for skipped in steps:
        t.finish_step([torch.tensor(skipped)])
    t.settle_nonfinite()  # counted on the device, brought to the host at log steps and checkpoints
    assert (t.state.nonfinite, t.state.nonfinite_run) == (3, 2)
    t.finish_step([torch.tensor(False), torch.tensor(True)])  # any phase skipped: the step is skipped
    with pytest.raises(TrainingError, match="3 steps in a row"):
        t.settle_nonfinite()
    assert t.state.nonfinite == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_gradient_norm_equals_torchs_total_norm_bitwise(dtype):
    from trainer.strategies.ddp import total_norm

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=gen, dtype=dtype) * scale
             for shape, scale in (((3,), 1.0), ((64, 32, 4, 4), 1e-3), ((1,), 1e4), ((7, 5), 0.5))]
    assert torch.equal(total_norm(grads), torch.nn.utils.get_total_norm(grads))
    grads[1][0, 0, 0, 0] = float("inf")
    assert torch.isinf(total_norm(grads))


def test_running_statistics_are_put_back_only_where_told(make_trainer):
    from trainer.running_stats import RunningStats, as_bytes, running_stats

    t = make_trainer("configs/dcgan_digits.yaml")
    stats = RunningStats(t.G.module, t.D.module)
    buffers = running_stats(t.G.module, t.D.module)
    assert {b.dtype for b in buffers} == {torch.float32, torch.int64} and len(stats.groups) == 1  # one per device
    bits = lambda: [as_bytes(b).clone() for b in buffers]  # noqa: E731  (bitwise, NaN included)
    stats.snapshot()
    before = bits()
    t.train_step()  # moves every running mean/var and count
    next(b for b in buffers if b.is_floating_point()).fill_(float("nan"))  # a bad batch's statistics
    moved = bits()
    assert not any(torch.equal(a, b) for a, b in zip(before, moved, strict=True))
    stats.restore(where=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(moved, bits(), strict=True))
    stats.restore(where=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, bits(), strict=True))


def test_fp16_scalers_are_independent(make_trainer):
    t = make_trainer("configs/wgan_gp_digits.yaml", "precision=fp16")
    assert t.G.scaler is not t.D.scaler and t.D.scaler.is_enabled()
    d_scale, g_scale = t.D.scaler.get_scale(), t.G.scaler.get_scale()
    d_before = [p.clone() for p in t.D.module.parameters()]
    d_out = t.D.module(torch.rand(16, 1, 32, 32))
    t.D.scaler.scale(d_out.float().mean() * float("inf")).backward()  # D overflows
    _, skipped = t.D.apply()
    assert skipped and t.D.scaler.get_scale() < d_scale
    assert all(torch.equal(a, b) for a, b in zip(d_before, t.D.module.parameters(), strict=True))
    g_before = [p.clone() for p in t.G.module.parameters()]
    stats = t.g_step(torch.randn(16, 16))
    assert stats["skipped/g"] == 0 and t.G.scaler.get_scale() == g_scale
    assert any(not torch.equal(a, b) for a, b in zip(g_before, t.G.module.parameters(), strict=True))


@pytest.mark.parametrize("recipe", ["configs/sngan_hinge_digits.yaml", "configs/dcgan_digits_cond.yaml"])
def test_recipe_trains_and_samples(make_trainer, recipe):
    from trainer.sampling import generate

    t = make_trainer(recipe)
    if t.cfg.model.spectral_norm:
        assert any("parametrizations" in n for n, _ in t.D.module.named_parameters())
    for _ in range(2):
        stats = t.train_step()
    assert all(torch.isfinite(v) for v in stats.values())
    out = generate(t.ema.model, t.fixed_z[:10], t.fixed_labels[:10] if t.fixed_labels is not None else None)
    assert out.shape == (10, 1, 32, 32)


def test_every_recipe_loads():
    recipes = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert len(recipes) >= 8
    for recipe in recipes:
        cfg = load_config(recipe, [])
        assert cfg.train.batch_size > 0, recipe


def test_point_recipe_trains_with_periodic_mode_evaluation(tmp_path):
    import json

    from tests.conftest import run_cli

    data = tmp_path / "ring8"
    r = run_cli("data", "make-shards", "--source", "gaussians", "--mixture", "ring8", "--n", "2000", "--out", str(data))
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = run_cli("train", "--config", "configs/gan_ring8.yaml", f"data.train={data}", f"run.dir={run}",
                "train.max_steps=4", "train.batch_size=64", "eval.every_steps=2", "eval.metrics=modes",
                "log.mlflow_uri=none", env={"WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    evals = [rec for rec in map(json.loads, open(run / "metrics.jsonl")) if "eval/modes_total" in rec]
    assert [rec["step"] for rec in evals] == [2, 4]
    assert all(rec["eval/modes_total"] == 8 and 0 <= rec["eval/high_quality"] <= 1 for rec in evals)
    assert (run / "samples" / "latest.png").exists()  # a scatter plot for point models


def test_linear_lr_decay_is_a_function_of_the_step(make_trainer):
    t = make_trainer("configs/dcgan_digits.yaml", "train.max_steps=10", "train.lr_decay_start=0.6",
                     "train.lr_g=1e-3", "train.lr_d=2e-3")
    assert [t.lr_factor(s) for s in (0, 5, 6, 8, 10)] == [1.0, 1.0, 1.0, 0.5, 0.0]
    t.state.step = 8  # e.g. just resumed there
    t.train_step()
    assert t.G.opt.param_groups[0]["lr"] == pytest.approx(5e-4)
    assert t.D.opt.param_groups[0]["lr"] == pytest.approx(1e-3)
