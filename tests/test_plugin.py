"""A model family from outside ganforge (tests/plugin_family): installed as a package, found through
the `ganforge.families` entry point, trained under 2-process DDP, resumed after SIGKILL, sampled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import BIN, REPO
from tests.test_resume import signal_tree

PACKAGE = os.path.join(REPO, "tests", "plugin_family")
TINY = ["model.arch=tinygan", "model.g_width=32", "model.d_width=32", "model.z_dim=16", "train.batch_size=16",
        "log.mlflow_uri=none", "log.every_steps=1", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    """The plug-in installed with pip into its own folder, on PYTHONPATH (the test's venv stays as it was)."""
    site, source = str(tmp_path_factory.mktemp("site")), str(tmp_path_factory.mktemp("src") / "plugin")
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))  # pip builds in place
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--target", site, source], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return dict(os.environ, PYTHONPATH=os.pathsep.join([site, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")


def ganforge(env: dict[str, str], *args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "ganforge"), *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=cwd)


def launch(run: str, data: str, steps: int) -> list[str]:
    return [os.path.join(BIN, "ganforge"), "launch", "--config", "configs/dcgan_digits.yaml", "--nproc-per-node", "2",
            f"data.train={data}", f"run.dir={run}", f"train.max_steps={steps}", *TINY]


def losses(run: str) -> dict[int, dict[str, float]]:
    out = {}
    for line in open(os.path.join(run, "metrics.jsonl")):
        rec = json.loads(line)
        out[rec["step"]] = {k: v for k, v in rec.items() if k.startswith("loss/")}
    return out


def test_plugin_family_is_refused_when_not_installed(tmp_path, digits_dir):
    r = subprocess.run([os.path.join(BIN, "ganforge"), "train", "--config", "configs/dcgan_digits.yaml",
                        f"data.train={digits_dir}", f"run.dir={tmp_path}/R", *TINY], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 2 and "config error: model.arch:" in r.stderr and "tinygan" in r.stderr


def test_plugin_module_that_cannot_be_imported_is_named(tmp_path, digits_dir):
    r = subprocess.run([os.path.join(BIN, "ganforge"), "--plugin", "no_such_plugin_module", "train", "--config",
                        "configs/dcgan_digits.yaml", f"data.train={digits_dir}", f"run.dir={tmp_path}/R"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "no_such_plugin_module" in r.stderr.strip().splitlines()[-1]


def test_plugin_checks_its_own_config_keys(plugin_env, tmp_path, digits_dir):
    r = ganforge(plugin_env, "train", "--config", "configs/dcgan_digits.yaml", f"data.train={digits_dir}",
                 f"run.dir={tmp_path}/R", *TINY, "model.num_classes=10")
    assert r.returncode == 2 and "config error: model.num_classes: tinygan is unconditional" in r.stderr


@pytest.mark.slow
def test_plugin_family_trains_under_two_process_ddp_resumes_after_sigkill_and_samples(plugin_env, tmp_path,
                                                                                        digits_dir):
    whole = str(tmp_path / "whole")
    r = subprocess.run(launch(whole, digits_dir, 10), capture_output=True, text=True, timeout=600, env=plugin_env,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world size 2" in r.stderr and sorted(losses(whole)) == list(range(1, 11))

    run = str(tmp_path / "split")
    proc = subprocess.Popen(launch(run, digits_dir, 10), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=plugin_env, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(f"{run}/metrics.jsonl") and len(open(f"{run}/metrics.jsonl").readlines()) >= 5:
            break
        time.sleep(0.02)
    signal_tree(proc, signal.SIGKILL)
    proc.wait(30)
    assert 5 <= max(losses(run)) < 10, "killed mid-run"
    r = subprocess.run(launch(run, digits_dir, 10), capture_output=True, text=True, timeout=600, env=plugin_env,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr
    assert losses(run) == losses(whole)

    arrays = []
    for d in (whole, run):
        s = ganforge(plugin_env, "sample", "--run", d, "--n", "8", "--out", f"{d}.npy")
        assert s.returncode == 0, s.stderr
        arrays.append(np.load(f"{d}.npy"))
    assert arrays[0].shape == (8, 1, 32, 32) and np.array_equal(arrays[0], arrays[1])


def test_python_api_trains_loads_and_generates_what_sample_writes(tmp_path, digits_dir):
    """trainer.api in a fresh interpreter: train 3 steps, load the generator, generate 8 images;
    they equal `ganforge sample --n 8 --seed 0`."""
    script = (f"from trainer import api\n"
              f"s = api.train('configs/dcgan_digits.yaml', ['data.train={digits_dir}', 'run.dir={tmp_path}/R', "
              f"'train.max_steps=3', 'model.g_width=8', 'model.d_width=8', 'log.mlflow_uri=none'])\n"
              f"assert s['step'] == 3, s\n"
              f"g, cfg = api.load_generator('{tmp_path}/R')\n"
              f"import numpy as np; np.save('{tmp_path}/api.npy', api.generate(g, cfg, 8, seed=0).numpy())\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = subprocess.run([os.path.join(BIN, "ganforge"), "sample", "--run", f"{tmp_path}/R", "--n", "8", "--out",
                        f"{tmp_path}/cli.npy"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert s.returncode == 0, s.stderr
    assert np.array_equal(np.load(f"{tmp_path}/api.npy"), np.load(f"{tmp_path}/cli.npy"))
