"""MLflow as users see it: the params of the run's family only, MLflow's source tags, the final
generator as a loadable and registered PyTorch model, the shards as dataset input, sample images
by step, and `ganforge eval` results in the training run, all against a real `mlflow server`."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request

import pytest
import torch

from tests.conftest import BIN, REPO, free_port, run_cli
from trainer.config import APPLIES_WHEN, Config, apply, to_flat
from trainer.families import FAMILIES, applicable_params

RECIPE = "configs/dcgan_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16"]


def params_of(**values) -> set[str]:
    return set(applicable_params(apply(Config(), values)))


def test_a_dcgan_run_has_no_stylegan2_translation_or_deepspeed_params():
    keys = params_of(model={"arch": "dcgan"})
    assert {"model.z_dim", "model.g_width", "train.lr_d", "loss.type", "log.register_model"} <= keys
    assert not [k for k in keys if k.startswith(("deepspeed.", "loss.pl_", "train.ada_"))]
    assert not keys & {"model.w_dim", "train.augment", "loss.cycle_weight", "loss.l1_weight", "model.n_blocks",
                       "data.train_b", "loss.gp_weight", "loss.clip", "model.depth"}


def test_each_family_strategy_and_loss_brings_its_own_params():
    assert {"loss.pl_weight", "model.w_dim", "train.ada_target"} <= params_of(model={"arch": "stylegan2"})
    cyclegan = params_of(model={"arch": "cyclegan"})
    assert {"loss.cycle_weight", "data.train_b", "model.d_layers"} <= cyclegan and "model.z_dim" not in cyclegan
    pix2pix = params_of(model={"arch": "pix2pix"})
    assert {"loss.l1_weight", "model.direction"} <= pix2pix and "loss.cycle_weight" not in pix2pix
    assert {"deepspeed.zero_stage", "deepspeed.bucket_size"} <= params_of(strategy="deepspeed")
    assert "loss.gp_weight" in params_of(loss={"type": "wgan_gp"}) and "loss.clip" in params_of(loss={"type": "wgan"})


def test_every_rule_names_real_keys():
    flat = to_flat(Config())
    for name, (decider, values) in APPLIES_WHEN.items():
        assert any(k == name or k.startswith(name) for k in flat), name
        assert decider in flat and values, name
    for arch, family in FAMILIES.items():
        for name in family.keys:
            assert any(k == name or k.startswith(name) for k in flat), (arch, name)


def test_the_served_conditional_generator_reads_labels_from_the_last_column():
    from trainer.config import ModelConfig
    from trainer.models import build_models
    from trainer.sampling import ServedGenerator

    torch.manual_seed(0)
    g, _ = build_models(ModelConfig(z_dim=16, g_width=8, d_width=8, num_classes=3))
    g.eval()
    z, labels = torch.randn(4, 16), torch.tensor([0, 1, 2, 1])
    served = ServedGenerator(g, conditional=True)
    assert torch.equal(served(torch.cat([z, labels.float()[:, None]], dim=1)), g(z, labels))


def test_flush_returns_once_every_point_queued_before_it_is_in_the_store(tmp_path):
    from trainer.telemetry.mlflow import MlflowTracker, open_client

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "flush", "flush")
    try:
        run_id = tracker.wait_ready(timeout=120)
        assert run_id
        for step in range(1, 31):
            tracker.log_metrics({"loss/g": step / 10, "loss/d": -step / 10}, step)
        assert tracker.flush(timeout=120)
        history = open_client(uri).get_metric_history(run_id, "loss/g")  # read at once, nothing waited for
        assert sorted((m.step, m.value) for m in history) == [(s, s / 10) for s in range(1, 31)]
    finally:
        tracker.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite store, proxied artifacts) on a free loopback port."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([os.path.join(BIN, "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.mark.slow
def test_a_finished_run_in_mlflow_has_source_tags_its_params_a_loadable_model_and_eval_metrics(
        mlflow_server, digits_dir, tmp_path, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    from data_pipeline import load_index
    from trainer.families import load_config
    from trainer.generate import load_generator

    run_dir = tmp_path / "run"
    r = run_cli("train", "--config", RECIPE, f"data.train={digits_dir}", f"run.dir={run_dir}", "run.name=tracked",
                *TINY, "train.max_steps=12", "log.every_steps=4", "log.sample_every_steps=6",
                "checkpoint.every_steps=3", "log.model_every_steps=6", f"log.mlflow_uri={mlflow_server}",
                "log.register_model=digits_g",
                env={"WORLD_SIZE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]

    client = MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("ganforge").experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == commit == tags["git.commit"]
    assert tags["mlflow.runName"] == "tracked" and tags["mlflow.source.name"] == "ganforge train"

    # Exactly the params that apply to a DCGAN trained with DDP and BCE.
    cfg = load_config(str(run_dir / "config.yaml"))
    assert set(run.data.params) == set(applicable_params(cfg))
    assert "loss.pl_weight" not in run.data.params and not any(k.startswith("deepspeed.") for k in run.data.params)

    # The shards are the run's training input, identified by the index fingerprint.
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == load_index(digits_dir).fingerprint()[:36]
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]

    # Sample grids as images at their steps; the plain generator artifact is still there.
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("samples+step+6+" in p for p in images) and any("samples+step+12+" in p for p in images)
    assert [a.path for a in client.list_artifacts(run_id, "model")] == ["model/generator_ema.pt"]

    # The EMA generator as an MLflow PyTorch model: found, loaded, and equal to generator_ema.pt.
    # set_tracking_uri also sets $MLFLOW_TRACKING_URI: undone after this test, or every later test's
    # `ganforge train` subprocess would log to this (then stopped) server instead of its own store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    by_name = {m.name: m for m in models}
    assert sorted(by_name) == ["generator", "generator-step6"]  # every 6 steps (not the last), and the final one
    logged = by_name["generator"]
    assert logged.source_run_id == run_id == by_name["generator-step6"].source_run_id
    at6 = mlflow.pytorch.load_model(f"models:/{by_name['generator-step6'].model_id}")
    g6, _, _ = load_generator(str(run_dir), str(run_dir / "checkpoints" / "step_00000006"))
    served = mlflow.pytorch.load_model(f"models:/{logged.model_id}")
    g, _, _ = load_generator(str(run_dir), str(run_dir / "generator_ema.pt"))
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = served(z)
        assert out.shape == (5, 1, 32, 32)
        assert torch.allclose(out, g(z), atol=1e-5)
        assert torch.allclose(at6(z), g6(z), atol=1e-5) and not torch.allclose(at6(z), out, atol=1e-3)
    info = mlflow.models.get_model_info(f"models:/{logged.model_id}")
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 16]
    assert info.saved_input_example_info is not None  # an input example travels with the model
    (version,) = client.search_model_versions("name='digits_g'")
    assert version.run_id == run_id

    # `ganforge eval --run` adds eval/fid to the same run, at the run's last step.
    weights = tmp_path / "inception.pth"
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    torch.save(inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True).state_dict(), weights)
    r = run_cli("eval", "--run", str(run_dir), "--metrics", "fid", "--n", "8", "--features", "inception",
                "--inception-weights", str(weights), "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    (point,) = client.get_metric_history(run_id, "eval/fid")
    assert point.step == 12 and point.value == pytest.approx(result["fid"], rel=1e-6)
    assert client.get_run(run_id).data.tags["eval.features"] == result["features"]
