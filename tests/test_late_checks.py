"""Silent failures made loud or harmless: skipped steps and BN statistics, skipped samples, bad checkpoints."""

from __future__ import annotations

import pytest
import torch

from trainer.families import load_config

RECIPE = "configs/dcgan_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16", "log.mlflow_uri=none"]


@pytest.fixture()
def make_trainer(digits_dir, tmp_path, monkeypatch):
    from trainer.distributed import init_distributed
    from trainer.families.gan import GANTrainer

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)

    def make(*overrides: str) -> GANTrainer:
        cfg = load_config(RECIPE, [f"data.train={digits_dir}", f"run.dir={tmp_path}/run", *TINY, *overrides])
        return GANTrainer(cfg, init_distributed())

    return make


def bn_buffers(*modules: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": b.clone() for i, m in enumerate(modules) for name, b in m.named_buffers()
            if name.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.mark.parametrize("n_critic", [1, 2])
def test_a_skipped_step_leaves_batchnorm_statistics_as_they_were(make_trainer, monkeypatch, n_critic):
    t = make_trainer(f"train.n_critic={n_critic}")
    t.train_step()  # statistics that moved away from their initial values
    before = bn_buffers(t.G.module, t.D.module)
    assert before and all(torch.isfinite(b.float()).all() for b in before.values())
    real = t.real_batch
    monkeypatch.setattr(t, "real_batch", lambda: (torch.full_like(real()[0], float("nan")), None))
    stats = t.train_step()
    t.settle_nonfinite()
    assert stats["skipped/d"] == 1 and t.state.nonfinite == 1
    after = bn_buffers(t.G.module, t.D.module)
    for name, b in before.items():
        assert torch.equal(after[name], b), f"{name} changed by a skipped step"
    assert all(torch.isfinite(p).all() for p in t.ema.model.buffers() if p.is_floating_point())
    monkeypatch.undo()
    t.train_step()  # and training goes on with finite statistics
    assert all(torch.isfinite(b.float()).all() for b in bn_buffers(t.G.module, t.D.module).values())


def test_a_skipped_translation_step_leaves_batchnorm_statistics_as_they_were(packaged, tmp_path, monkeypatch):
    from tests.test_translation import pix_data
    from trainer.distributed import DistEnv
    from trainer.families.pix2pix import Pix2PixTrainer

    cfg = load_config("configs/pix2pix_edges.yaml", [*pix_data(packaged["ep"]), f"run.dir={tmp_path}/run",
                                                     "model.resolution=32", "model.g_width=8", "model.d_width=8",
                                                     "train.batch_size=4", "model.norm=batch", "log.mlflow_uri=none"])
    t = Pix2PixTrainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    t.train_step()
    before = bn_buffers(t.G.module, t.D.module)
    assert before, "pix2pix's networks hold BatchNorm statistics"
    real = t.real_batch
    monkeypatch.setattr(t, "real_batch", lambda: tuple(torch.full_like(x, float("nan")) for x in real()))
    stats = t.train_step()
    t.settle_nonfinite()
    assert stats["skipped/g"] == 1 and t.state.nonfinite == 1
    after = bn_buffers(t.G.module, t.D.module)
    for name, b in before.items():
        assert torch.equal(after[name], b), f"{name} changed by a skipped step"


# -- ganforge sample on files that hold no usable generator ---------------------------------------------
@pytest.fixture(scope="module")
def trained_run(digits_dir, tmp_path_factory) -> str:
    from tests.conftest import run_cli

    run = str(tmp_path_factory.mktemp("sample") / "run")
    r = run_cli("train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run}", *TINY,
                "train.max_steps=2", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # What Reporter.save_generator writes at the end of a run with MLflow (off here, for speed).
    from trainer.checkpoint import load_latest

    state = load_latest(run)[1]
    torch.save({k: state[k] for k in ("step", "config", "G_ema")}, f"{run}/generator_ema.pt")
    return run


@pytest.mark.parametrize("what", ["generator_ema.pt --no-ema", "bare state_dict", "no config"])
def test_sampling_a_file_without_a_usable_generator_is_one_clear_line(trained_run, tmp_path, what):
    import os

    from tests.conftest import run_cli

    path = os.path.join(trained_run, "generator_ema.pt")
    extra = ["--no-ema"] if what.endswith("--no-ema") else []
    if what == "bare state_dict":
        path = str(tmp_path / "g.pt")
        torch.save(torch.load(os.path.join(trained_run, "generator_ema.pt"), weights_only=True)["G_ema"], path)
    elif what == "no config":
        path = str(tmp_path / "g.pt")
        state = torch.load(os.path.join(trained_run, "generator_ema.pt"), weights_only=True)
        torch.save({k: v for k, v in state.items() if k != "config"}, path)
    r = run_cli("sample", "--run", trained_run, "--checkpoint", path, "--n", "4", "--seed", "0",
                "--out", str(tmp_path / "x.npy"), *extra)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr and path in lines[0], r.stderr
    assert {"generator_ema.pt --no-ema": "without --no-ema", "bare state_dict": "not a ganforge checkpoint",
            "no config": "no 'config' entry"}[what] in lines[0]


# -- the skipped-sample total on /metrics -----------------------------------------------------------------
def test_skipped_total_is_exported_to_prometheus():
    import re
    import urllib.request

    from tests.conftest import free_port
    from trainer.telemetry.prometheus import PrometheusExporter

    e = PrometheusExporter(free_port(), rank=0, job="digits", world_size=2, device=torch.device("cpu"),
                           addr="127.0.0.1")
    try:
        for total in (0, 3, 3, 5):  # the job-wide running total, at each log step
            e.report({}, 0, torch.device("cpu"), 0, skipped_samples=total)
        text = urllib.request.urlopen(f"http://127.0.0.1:{e.port}/metrics", timeout=5).read().decode()
    finally:
        e.close()
    assert re.search(r"^ganforge_data_skipped_samples_total\{.*\} 5\.0$", text, re.M), text


# -- data.on_error=skip: counted over ranks, exported, bounded; worker errors in one line -------------
SMALL_RUN = [*TINY, "model.resolution=16", "train.batch_size=12", "log.every_steps=1"]


def break_samples(directory: str, keys: list[str]) -> None:
    """Destroy the PNG body of the samples `keys` (their CRC updated: they fail at decode time)."""
    import json
    import os
    import zlib

    doc = json.load(open(os.path.join(directory, "index.json")))
    for shard in doc["shards"]:
        path = os.path.join(directory, shard["name"])
        data = bytearray(open(path, "rb").read())
        for rec in shard["samples"]:
            if rec["key"] in keys:
                off, size, _ = rec["members"]["png"]
                data[off + 20:off + size] = b"\0" * (size - 20)
                rec["members"]["png"][2] = zlib.crc32(bytes(data[off:off + size]))
        open(path, "wb").write(bytes(data))
    json.dump(doc, open(os.path.join(directory, "index.json"), "w"))


def first_key_per_rank(directory: str, world_size: int) -> list[str]:
    from tests.conftest import run_cli

    r = run_cli("data", "plan", directory, "--world-size", str(world_size))
    assert r.returncode == 0, r.stderr
    plan = [__import__("json").loads(line) for line in r.stdout.splitlines()]
    return [next(p["key"] for p in plan if p["rank"] == rank) for rank in range(world_size)]


def metrics(run: str) -> list[dict]:
    import json
    import os

    return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]


def test_skipped_samples_are_summed_over_ranks(small_dir, tmp_path):
    from tests.conftest import accelerate_cpu

    break_samples(small_dir, first_key_per_rank(small_dir, 2))  # one bad sample on each rank
    run = str(tmp_path / "run")
    # 60 samples, global batch 12: 5 steps read the epoch once, both bad samples included.
    r = accelerate_cpu(2, "--config", RECIPE, f"data.train={small_dir}", f"run.dir={run}", *SMALL_RUN,
                       "data.on_error=skip", "data.max_skip_fraction=0.05", "train.max_steps=5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert metrics(run)[-1]["data/skipped"] == 2


def test_too_many_skipped_samples_stop_the_run_with_one_line(small_dir, tmp_path):
    from tests.conftest import accelerate_cpu

    break_samples(small_dir, first_key_per_rank(small_dir, 2))  # 2 of 60: 3.3 %, over the default 1 %
    r = accelerate_cpu(2, "--config", RECIPE, f"data.train={small_dir}", f"run.dir={tmp_path}/run", *SMALL_RUN,
                       "data.on_error=skip", "train.max_steps=5")
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("ganforge: error:")]
    assert errors and all(e == errors[0] for e in errors), r.stderr[-3000:]  # the same line on each rank
    assert "data.max_skip_fraction=0.01" in errors[0] and "%" in errors[0]
    assert "trainer/data.py\", line" not in r.stderr, r.stderr[-3000:]  # no trainer traceback (accelerate prints its own)


def test_max_skip_fraction_is_checked_before_anything_starts(small_dir, tmp_path):
    from tests.conftest import run_cli

    r = run_cli("train", "--config", RECIPE, f"data.train={small_dir}", f"run.dir={tmp_path}/run",
                "data.max_skip_fraction=1.5")
    assert r.returncode == 2 and "data.max_skip_fraction" in r.stderr


def test_a_data_error_in_a_loader_worker_reaches_the_user_as_one_line(small_dir, tmp_path):
    from tests.conftest import run_cli

    key = first_key_per_rank(small_dir, 1)[0]
    break_samples(small_dir, [key])
    r = run_cli("train", "--config", RECIPE, f"data.train={small_dir}", f"run.dir={tmp_path}/run", *SMALL_RUN,
                "data.num_workers=1", "train.max_steps=3", timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("ganforge: error:")]
    assert len(errors) == 1 and f"key {key}: cannot decode" in errors[0], r.stderr[-3000:]
