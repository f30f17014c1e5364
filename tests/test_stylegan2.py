"""StyleGAN2 + ADA: the modulated convolution, the augmentation and its p, DDP agreement of the
regularisers, exact resume, truncation, and a 2-process run of the digits recipe."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import BIN, REPO, accelerate_cpu, free_port, run_cli
from trainer.config import ConfigError, to_dict
from trainer.families import load_config

RECIPE = "configs/stylegan2_digits.yaml"
# A smaller net than the recipe's, with every phase and ADA active within a few steps.
TINY = ["model.g_width=16", "model.d_width=16", "model.channel_base=256", "model.z_dim=32", "model.w_dim=32",
        "train.batch_size=8", "log.mlflow_uri=none", "train.threads=1", "loss.r1_every=4", "loss.pl_every=2"]
ENV = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")


def tiny_cfg(*overrides: str):
    return load_config(RECIPE, ["data.train=unused", *TINY, *overrides])


# -- the model --------------------------------------------------------------------------------------
def test_modulated_conv_matches_an_explicit_per_sample_convolution():
    from trainer.models.stylegan2 import modulated_conv2d

    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 5, 8, 8), torch.randn(4, 5, 3, 3), torch.randn(3, 5)
    for demodulate in (True, False):
        got = modulated_conv2d(x, weight, styles, demodulate=demodulate, padding=1)
        for b in range(3):
            w = weight * styles[b].reshape(1, 5, 1, 1)  # modulate the input maps
            if demodulate:
                w = w / w.pow(2).sum(dim=(1, 2, 3), keepdim=True).add(1e-8).sqrt()
            want = F.conv2d(x[b:b + 1], w, padding=1)
            torch.testing.assert_close(got[b:b + 1], want, rtol=1e-5, atol=1e-5)
    # demodulation keeps unit-variance inputs at unit variance, whatever the style's scale
    out = modulated_conv2d(torch.randn(64, 32, 8, 8), torch.randn(32, 32, 3, 3), 10 * torch.rand(64, 32))
    assert 0.8 < float(out.std()) < 1.2


def test_generator_sizes_mixing_truncation_and_fixed_noise_in_eval():
    from trainer.models import build_models

    cfg = tiny_cfg()
    g, d = build_models(cfg.model)
    assert g.num_ws == 8 and len(g.noise_shapes(2)) == 7  # 32x32: 4 blocks
    z = torch.randn(4, 32)
    g.eval()
    with torch.no_grad():
        img = g(z)
        assert img.shape == (4, 1, 32, 32) and d(img).shape == (4,)
        assert torch.equal(img, g(z)), "eval mode without noise maps uses the fixed ones"
        g.mapping.w_avg.normal_()
        collapsed = g(z, psi=0.0)  # every w replaced by w_avg: one image
        assert torch.allclose(collapsed[0], collapsed[3], atol=1e-6)
        ws = g.mix(torch.zeros(2, 32), torch.ones(2, 32), torch.tensor([3, 8]))
        assert ws[0, :3].eq(0).all() and ws[0, 3:].eq(1).all() and ws[1].eq(0).all()


def test_stylegan2_config_errors_name_the_key():
    for override, key in [("model.resolution=12", "model.resolution"), ("loss.type=hinge", "loss.type"),
                          ("model.style_mixing=1.5", "model.style_mixing"), ("train.augment=always", "train.augment"),
                          ("loss.pl_batch_shrink=16", "loss.pl_batch_shrink"), ("model.w_dim=0", "model.w_dim")]:
        with pytest.raises(ConfigError) as e:
            tiny_cfg(override)
        assert e.value.key == key, override
    with pytest.raises(ConfigError) as e:
        load_config("configs/dcgan_digits.yaml", ["train.augment=ada"])
    assert e.value.key == "train.augment"


# -- augmentation --------------------------------------------------------------------------------
def test_augment_is_identity_at_p0_exact_for_blits_and_differentiable():
    from trainer.augment import RANDOM_COLUMNS, augment

    x = torch.rand(2, 3, 16, 16) * 2 - 1
    u = torch.rand(2, RANDOM_COLUMNS)
    assert torch.equal(augment(x, u, 0.0), x)
    off = torch.full((1, RANDOM_COLUMNS), 0.999)  # every coin says no at p = 0.5
    flip = off.clone()
    flip[0, :2] = torch.tensor([0.0, 0.9])
    torch.testing.assert_close(augment(x[:1], flip, 0.5), x[:1].flip(3), atol=1e-5, rtol=0)
    rot = off.clone()
    rot[0, 2:4] = torch.tensor([0.0, 0.3])
    torch.testing.assert_close(augment(x[:1], rot, 0.5), x[:1].rot90(1, (2, 3)), atol=1e-5, rtol=0)  # i = 1: as the reference
    shift = off.clone()
    shift[0, 4:7] = torch.tensor([0.0, 1.0, 0.5])  # +2 pixels (0.125 of 16) in x, none in y
    torch.testing.assert_close(augment(x[:1], shift, 0.5)[..., 2:], x[:1, ..., :-2], atol=1e-5, rtol=0)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(augment(xg, u, 1.0).square().sum(), xg, create_graph=True)
    assert grad.abs().sum() > 0 and grad.requires_grad  # R1 goes through it


def test_ada_p_rises_while_d_overfits_and_falls_when_it_does_not():
    from trainer.augment import AdaptiveP

    ada = AdaptiveP(0.0, target=0.6, interval=4, kimg=0.1, batch_size=8)  # moves 32/100 per interval
    ps = []
    for step in range(12):  # D sure of every real image: r_t = 1 > 0.6
        ada.observe(torch.ones(8))
        ada.update(step)
        ps.append(ada.p)
    assert ps[:3] == [0.0] * 3 and ps[3] == pytest.approx(0.32) and ps[-1] == pytest.approx(0.96) and ada.rt == 1.0
    assert ps[4:7] == [ps[3]] * 3, "p moves only every `interval` steps"
    for step in range(12, 20):  # half the reals called fake: r_t = 0 < 0.6
        ada.observe(torch.tensor([1.0, -1.0] * 4))
        ada.update(step)
    assert ada.p == pytest.approx(0.96 - 0.64) and ada.rt == 0.0
    for step in range(20, 40):
        ada.observe(-torch.ones(8))
        ada.update(step)
    assert ada.p == 0.0, "p stays within [0, 1]"


# -- distributed agreement -------------------------------------------------------------------------
@pytest.mark.slow
def test_r1_and_path_length_under_2_process_ddp_equal_the_single_process_values(digits_dir, tmp_path):
    # mbstd off: its groups are per-rank batches, the one thing that is not world-size invariant
    args = ["tests/stylegan2_probe.py", str(tmp_path), f"data.train={digits_dir}", *TINY, "model.mbstd_group=0"]
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--multi_gpu", "--num_processes", "2"]
    r = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"world{w}.pt", weights_only=True) for w in (1, 2))
    for key in ("pl", "r1", "pl_mean"):
        assert float(one[key].reshape(-1)[0]) > 0
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-7)
    for net in ("G_grads", "D_grads"):
        for a, b in zip(one[net], two[net], strict=True):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)


# -- resume, sampling, the recipe end to end ---------------------------------------------------------
def final_state(run: str, step: int) -> dict:
    from trainer.checkpoint import read_checkpoint

    return read_checkpoint(os.path.join(run, "checkpoints", f"step_{step:08d}"))


@pytest.mark.slow
def test_resume_is_exact_including_the_augmentation_probability(digits_dir, tmp_path):
    args = ["train", "--config", RECIPE, f"data.train={digits_dir}", *TINY, "checkpoint.every_steps=4",
            "log.every_steps=1", "train.augment_p=0.3", "train.ada_interval=3", "train.ada_kimg=0.1"]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    for run, steps in ((whole, 8), (split, 4), (split, 8)):
        r = run_cli(*args, f"run.dir={run}", f"train.max_steps={steps}", env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    a, b = final_state(whole, 8), final_state(split, 8)
    for net in ("G", "D", "G_ema"):
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), f"{net}.{k} differs after resume"
    assert a["augment"]["p"] == b["augment"]["p"] != 0.3, "p moved, and the same way"
    assert torch.equal(a["augment"]["signs"], b["augment"]["signs"]) and torch.equal(a["pl_mean"], b["pl_mean"])
    logs = [[json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))] for run in (whole, split)]
    assert [rec["augment/p"] for rec in logs[0]] == [rec["augment/p"] for rec in logs[1]]


def test_sample_truncation_for_stylegan2_and_refused_for_other_archs(tmp_path):
    from trainer.checkpoint import write_checkpoint
    from trainer.generate import sample_to_file
    from trainer.models import build_models

    cfg = tiny_cfg(f"run.dir={tmp_path}/sg2")
    g, _ = build_models(cfg.model)
    write_checkpoint(cfg.run.dir, 1, {"step": 1, "config": to_dict(cfg), "G_ema": g.state_dict()})
    out = str(tmp_path / "t.npy")
    sample_to_file(cfg.run.dir, 6, 0, out, truncation=0.0)
    x = np.load(out)
    assert x.shape == (6, 1, 32, 32) and np.abs(x - x[0]).max() < 1e-5, "psi = 0: every sample is the mean w"
    sample_to_file(cfg.run.dir, 6, 0, out, truncation=0.7)
    assert np.abs(np.load(out) - np.load(out)[0]).max() > 1e-3
    dc = load_config("configs/dcgan_digits.yaml", ["data.train=unused", f"run.dir={tmp_path}/dc"])
    g, _ = build_models(dc.model)
    write_checkpoint(dc.run.dir, 1, {"step": 1, "config": to_dict(dc), "G_ema": g.state_dict()})
    with pytest.raises(ConfigError, match="truncation") as e:
        sample_to_file(dc.run.dir, 4, 0, str(tmp_path / "d.png"), truncation=0.7)
    assert e.value.key == "--truncation"


@pytest.mark.slow
def test_two_process_digits_recipe_trains_and_samples_a_truncated_grid(digits_dir, tmp_path):
    run = tmp_path / "run"
    r = accelerate_cpu(2, "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", "train.max_steps=20",
                       "log.mlflow_uri=none", "train.threads=1", "log.every_steps=10")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stderr and (run / "checkpoints" / "step_00000020").exists()
    last = [json.loads(line) for line in open(run / "metrics.jsonl")][-1]
    assert all(math.isfinite(v) for k, v in last.items() if k.startswith("loss/"))
    png = tmp_path / "g.png"
    r = run_cli("sample", "--run", str(run), "--n", "16", "--seed", "0", "--truncation", "0.7", "--out", str(png))
    assert r.returncode == 0, r.stderr
    from PIL import Image

    assert Image.open(png).size == (4 * 34 + 2, 4 * 34 + 2)


@pytest.mark.slow
def test_two_process_run_killed_mid_run_resumes_exactly(digits_dir, tmp_path):
    """SIGKILL a 2-process run of the digits recipe, run the same command again: the weights, the
    EMA, ADA's state and the path-length mean at step 20 equal those of a run never stopped."""
    import signal

    from tests.test_resume import signal_tree, start_and_wait_for_step

    def cmd(run):
        return [os.path.join(BIN, "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--multi_gpu",
                "--num_processes", "2", "trainer/main.py", "--config", RECIPE, f"data.train={digits_dir}",
                f"run.dir={run}", *TINY, "train.max_steps=20", "checkpoint.every_steps=5", "log.every_steps=1",
                "train.augment_p=0.2", "train.ada_interval=2", "train.ada_kimg=0.1", "model.mbstd_group=2"]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = subprocess.run(cmd(whole), capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = start_and_wait_for_step(cmd(killed), 8)
    signal_tree(proc, signal.SIGKILL)
    proc.wait(30)
    assert not (killed / "checkpoints" / "step_00000020").exists(), "the job must be killed mid-run"
    r = subprocess.run(cmd(killed), capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    a, b = final_state(str(whole), 20), final_state(str(killed), 20)
    for net in ("G", "D", "G_ema"):
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), f"{net}.{k} differs after resume"
    assert a["augment"]["p"] == b["augment"]["p"] and torch.equal(a["pl_mean"], b["pl_mean"])
