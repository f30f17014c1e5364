"""GPU paths: every family's step in bf16 and fp16, channels_last, compile, the EMA, exact resume,
DeepSpeed, sampling, FID features and DDP over CUDA tensors.

Marked `gpu`: `make gpu-check` runs them on a CUDA machine. Without CUDA they are skipped, except
with GPU_CHECK_CPU_SMOKE=1, which runs the same code on the CPU (a check that the suite itself
works; the figures mean nothing there).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from tests.conftest import REPO, free_port
from tests.test_translation import cycle_data, pix_data
from trainer.checkpoint import read_checkpoint
from trainer.families import load_config

SMOKE = os.environ.get("GPU_CHECK_CPU_SMOKE") == "1"
DEVICE = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    DEVICE.type != "cuda" and not SMOKE,
    reason="needs a CUDA device: `make gpu-check` on a GPU machine (GPU_CHECK_CPU_SMOKE=1 runs it on the CPU)")]

DIGITS = ["model.g_width=16", "model.d_width=16", "model.z_dim=32", "train.batch_size=32"]
STYLEGAN2 = ["model.g_width=32", "model.d_width=32", "model.channel_base=512", "model.z_dim=32", "model.w_dim=32",
             "train.batch_size=16", "loss.r1_every=2", "loss.pl_every=2", "train.augment_p=0.3"]
TRANSLATION = ["model.resolution=32", "model.g_width=16", "model.d_width=16", "model.n_blocks=2",
               "model.d_layers=2", "train.batch_size=8"]
COMMON = ["log.mlflow_uri=none", "log.every_steps=1", "log.sample_every_steps=1000", "checkpoint.every_steps=1000"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)


def family_args(family: str, digits_dir: str, packaged: dict[str, str]) -> tuple[str, list[str]]:
    """(recipe, overrides): a small version of each family's recipe on data this machine can make."""
    if family == "dcgan":
        return "configs/dcgan_digits.yaml", [f"data.train={digits_dir}", *DIGITS]
    if family == "wgan_gp":
        return "configs/wgan_gp_digits.yaml", [f"data.train={digits_dir}", *DIGITS]
    if family == "stylegan2":
        return "configs/stylegan2_digits.yaml", [f"data.train={digits_dir}", *STYLEGAN2]
    if family == "cyclegan":
        return "configs/cyclegan_sample_images.yaml", [*cycle_data(packaged["si"]), *TRANSLATION]
    return "configs/pix2pix_edges.yaml", [*pix_data(packaged["ep"]), *TRANSLATION]


def train(recipe: str, run_dir: str, *overrides: str) -> dict:
    """A whole run in this process (reporter, samples, checkpoint and EMA included)."""
    from trainer.run import run_training

    cfg = load_config(recipe, [f"run.dir={run_dir}", *COMMON, *overrides])
    return run_training(cfg)


def logged(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss/' in line]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("family", ["dcgan", "wgan_gp", "cyclegan", "pix2pix", "stylegan2"])
def test_every_family_trains_logs_and_checkpoints_in_half_precision(family, precision, digits_dir, packaged, tmp_path):
    recipe, args = family_args(family, digits_dir, packaged)
    steps = 4 if SMOKE else 8
    summary = train(recipe, str(tmp_path / "run"), *args, f"precision={precision}", f"train.max_steps={steps}")
    assert summary["step"] == steps
    records = logged(str(tmp_path / "run"))
    assert [r["step"] for r in records] == list(range(1, steps + 1))  # every step reached the reporter
    last = records[-1]
    assert all(math.isfinite(v) for k, v in last.items() if k.startswith(("loss/", "grad_norm/")))
    # fp16's scaler may skip its first steps while it finds its scale; bf16 needs no scaler
    assert last["train/nonfinite_steps"] < (steps if precision == "fp16" else 1)
    state = read_checkpoint(summary["checkpoint"])
    assert all(torch.isfinite(v).all() for v in state["G"].values() if v.is_floating_point())


@pytest.mark.parametrize("family", ["dcgan", "wgan_gp", "cyclegan", "pix2pix", "stylegan2"])
def test_every_statistic_of_a_step_lives_on_the_trainer_device(family, digits_dir, packaged, tmp_path):
    from trainer.distributed import init_distributed
    from trainer.run import make_trainer

    recipe, args = family_args(family, digits_dir, packaged)
    cfg = load_config(recipe, [f"run.dir={tmp_path}/run", *COMMON, *args, "precision=bf16"])
    trainer = make_trainer(cfg, init_distributed())
    for _ in range(2):
        stats = trainer.train_step()
        wrong = {k: str(v.device) for k, v in stats.items() if v.device != trainer.env.device}
        assert not wrong, f"statistics off the trainer's device {trainer.env.device}: {wrong}"
        assert all(v.dim() == 0 for v in stats.values())


@pytest.mark.parametrize("compile_", [None, "default", "reduce-overhead"])
def test_channels_last_or_compiled_networks_train(compile_, digits_dir, tmp_path):
    from torch._dynamo.utils import counters

    from trainer.distributed import init_distributed
    from trainer.families.gan import GANTrainer

    mode = [f"train.compile_mode={compile_}"] if compile_ else []
    cfg = load_config("configs/dcgan_digits.yaml", [f"run.dir={tmp_path}/run", *COMMON, f"data.train={digits_dir}",
                                                    *DIGITS, "precision=bf16", f"train.compile={bool(compile_)}", *mode])
    torch._dynamo.reset()  # compiled frames of earlier tests count toward dynamo's recompile limit
    counters.clear()
    trainer = GANTrainer(cfg, init_distributed())
    convs = [p for p in trainer.D.network.parameters() if p.dim() == 4]
    # channels_last on the GPU, except under compile (inductor picks the layout itself)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs) == (
        DEVICE.type == "cuda" and not compile_)
    before = [p.detach().clone() for p in trainer.G.network.parameters()]
    with warnings.catch_warnings():  # cudagraph trees fall back to eager with only this warning (once)
        warnings.filterwarnings("error", message=".*Unable to hit fast path of CUDAGraphs")
        for _ in range(3):
            stats = trainer.train_step()
    assert all(torch.isfinite(v) for v in stats.values())
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.G.network.parameters(), strict=True))
    if compile_ == "reduce-overhead" and DEVICE.type == "cuda":  # the networks' steps replay CUDA graphs
        assert trainer.cuda_graphs and not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            trainer.train_step()
            torch.cuda.synchronize()
        launches = sum(1 for e in prof.events() if e.name in ("cudaGraphLaunch", "cuGraphLaunch"))
        assert launches >= 4, f"{launches} CUDA graph launches in a step (G and D, forward and backward)"


def test_ema_follows_its_formula_on_the_device(digits_dir, tmp_path):
    from trainer.distributed import init_distributed
    from trainer.ema import ema_beta
    from trainer.families.gan import GANTrainer

    cfg = load_config("configs/dcgan_digits.yaml", [f"run.dir={tmp_path}/run", *COMMON, f"data.train={digits_dir}",
                                                    *DIGITS, "precision=bf16"])
    t = GANTrainer(cfg, init_distributed())
    t.train_step()
    ema_before = [p.clone() for p in t.ema.model.parameters()]
    t.train_step()
    beta = ema_beta(32, 64, cfg.train.ema_kimg, cfg.train.ema_rampup)
    for e0, e1, g in zip(ema_before, t.ema.model.parameters(), t.G.network.parameters(), strict=True):
        assert e1.device == DEVICE
        torch.testing.assert_close(e1, g.detach() + beta * (e0 - g.detach()))


@pytest.fixture()
def deterministic():
    yield
    torch.use_deterministic_algorithms(False)


def test_resume_on_the_device_is_bitwise_identical_with_deterministic_kernels(digits_dir, tmp_path, deterministic):
    args = ["configs/dcgan_digits.yaml", f"data.train={digits_dir}", *DIGITS, "precision=bf16",
            "train.deterministic=true", "checkpoint.every_steps=3"]
    whole = train(args[0], str(tmp_path / "whole"), *args[1:], "train.max_steps=6")
    train(args[0], str(tmp_path / "split"), *args[1:], "train.max_steps=3")
    resumed = train(args[0], str(tmp_path / "split"), *args[1:], "train.max_steps=6")
    a, b = read_checkpoint(whole["checkpoint"]), read_checkpoint(resumed["checkpoint"])
    for net in ("G", "D", "G_ema"):
        for k, v in a[net].items():
            assert torch.equal(v, b[net][k]), f"{net}.{k} differs after resuming on {DEVICE}"


def test_deepspeed_zero2_trains_on_one_device(digits_dir, tmp_path):
    pytest.importorskip("deepspeed", reason="make gpu-check carries the deepspeed wheel")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           "trainer/main.py", "--config", "configs/wgan_gp_digits.yaml", f"run.dir={run}", *COMMON,
           f"data.train={digits_dir}", *DIGITS, "strategy=deepspeed", "deepspeed.zero_stage=2", "precision=bf16",
           "train.max_steps=4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert f"on {DEVICE.type}" in r.stderr
    last = logged(str(run))[-1]
    assert last["step"] == 4 and all(math.isfinite(v) for k, v in last.items() if k.startswith("grad_norm/"))


def test_sampling_and_fid_features_on_the_device_match_the_cpu(digits_dir, tmp_path):
    from torchvision.models import inception_v3

    from trainer.evaluation.features import extract
    from trainer.evaluation.inception import load_inception
    from trainer.generate import load_generator
    from trainer.sampling import generate, latents

    train("configs/dcgan_digits.yaml", str(tmp_path / "run"), f"data.train={digits_dir}", *DIGITS,
          "precision=bf16", "train.max_steps=2")
    g = load_generator(str(tmp_path / "run"))[0]
    z = latents(0, 16, 32)
    on_cpu = generate(g, z)
    on_device = generate(g.to(DEVICE), z.to(DEVICE))  # computed on the device, returned on the CPU
    assert next(g.parameters()).device.type == DEVICE.type
    # TF32 convolutions on the GPU: measured max difference ~1e-3 of outputs in [-1, 1]
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=0, atol=1e-2)

    torch.manual_seed(0)
    path = str(tmp_path / "inception.pth")
    torch.save(inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True).state_dict(), path)
    ext = load_inception(path)
    images = on_cpu[:8]
    feats_cpu = extract(ext, images, "cpu")
    feats_dev = extract(ext.to(DEVICE), images, DEVICE)
    assert feats_dev.shape == (8, 2048) and feats_dev.dtype == torch.float64
    assert (feats_dev - feats_cpu).norm() <= 2e-2 * feats_cpu.norm()


def test_two_processes_sharing_the_device_over_gloo_keep_identical_weights(digits_dir, tmp_path):
    out = tmp_path / "probe"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "tests/ddp_probe.py", str(out), f"data.train={digits_dir}", *DIGITS, "log.mlflow_uri=none",
           "precision=bf16"]
    env = dict(os.environ, GANFORGE_BACKEND="gloo", OMP_NUM_THREADS="1", PROBE_STEPS="4")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert [s["world_size"] for s in ranks] == [2, 2]
    assert [s["device"] for s in ranks] == [DEVICE.type] * 2
    for net in ("G", "D"):
        for name, value in ranks[0][net].items():
            assert torch.equal(value, ranks[1][net][name]), f"{net}.{name} differs between ranks"
