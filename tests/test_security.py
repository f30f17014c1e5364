"""Hostile input and secrets: shard indexes from elsewhere, credentials in URLs and config values."""

from __future__ import annotations

import json
import os

import pytest

from data_pipeline import DataError, load_index
from data_pipeline.loader import ShardReader
from tests.conftest import run_cli


def rename_first_shard(directory: str, name: str) -> None:
    path = os.path.join(directory, "index.json")
    doc = json.load(open(path))
    doc["shards"][0]["name"] = name
    json.dump(doc, open(path, "w"))


def test_a_shard_name_with_shell_syntax_runs_nothing_through_a_pipe_location(small_dir, tmp_path):
    pwned = tmp_path / "PWNED"
    rename_first_shard(small_dir, f"000000.tar; touch {pwned} #")
    try:
        ShardReader(load_index(f"pipe:cat {small_dir}")).read(0)
        message = ""
    except DataError as e:
        message = str(e)
    assert not pwned.exists()
    assert "index.json" in message and "touch" in message and "\n" not in message


@pytest.mark.parametrize("name", ["../secret.tar", "/etc/passwd", "sub/000000.tar", ".hidden.tar", "..", "",
                                  "a b.tar", "$(id).tar", "x`id`.tar", "a\n.tar"])
def test_shard_names_that_are_not_plain_file_names_are_refused(small_dir, name):
    rename_first_shard(small_dir, name)
    with pytest.raises(DataError, match="index.json.*shard name"):
        load_index(small_dir)


def test_verify_refuses_an_index_that_points_outside_its_directory(small_dir, tmp_path):
    outside = tmp_path / "outside.tar"
    outside.write_bytes(open(os.path.join(small_dir, "000000.tar"), "rb").read())
    rename_first_shard(small_dir, "../outside.tar")
    r = run_cli("data", "verify", small_dir)
    assert r.returncode == 1 and "../outside.tar" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_pipe_locations_are_read_without_a_shell(small_dir, monkeypatch):
    import subprocess

    from data_pipeline import index as index_module

    calls = []
    real_run = subprocess.run

    def spy(args, **kw):
        calls.append((args, kw.get("shell", False)))
        return real_run(args, **kw)

    monkeypatch.setattr(index_module.subprocess, "run", spy)
    index = load_index(f"pipe:cat {small_dir}")
    assert ShardReader(index).read(0)[1] == index.keys()[0]
    assert calls == [(["cat", f"{small_dir}/index.json"], False), (["cat", f"{small_dir}/000000.tar"], False)]
    with pytest.raises(DataError, match="000000.tar: cannot fetch .*exited with status 1"):
        index_module.read_location("pipe:cat /nonexistent/000000.tar")


@pytest.mark.parametrize("raw, shown", [
    ("https://alice:s3cret@host/data", "https://alice:***@host/data"),
    ("https://ghp_s3cret@github.com/x", "https://***@github.com/x"),
    ("s3://bucket/k?X-Amz-Date=1&X-Amz-Signature=s3cret", "s3://bucket/k?X-Amz-Date=1&X-Amz-Signature=***"),
    ("https://acct.blob.core.windows.net/c?sv=2020&sig=s3cret", "https://acct.blob.core.windows.net/c?sv=2020&sig=***"),
    ("http://h/x?token=s3cret&page=2", "http://h/x?token=***&page=2"),
    ("postgresql://ml:s3cret@db:5432/mlflow", "postgresql://ml:***@db:5432/mlflow"),
    ('pipe:curl -s -H "Authorization: Bearer s3cret-t0ken" https://h/d', 'pipe:curl -s -H "Authorization: Bearer ***" https://h/d'),
    ("sqlite:////runs/mlflow.db", "sqlite:////runs/mlflow.db"),
    ("data/digits", "data/digits"),
])
def test_redaction_hides_passwords_and_tokens_and_keeps_everything_else(raw, shown):
    from trainer.redact import redact

    assert redact(raw) == shown
    assert redact({"data": {"train": raw}, "n": [raw, 3]}) == {"data": {"train": shown}, "n": [shown, 3]}


def test_a_password_in_data_train_is_recorded_nowhere(tmp_path, digits_dir):
    """A real run streaming over http with user:password@: config.yaml, checkpoints, MLflow and output stay clean."""
    import subprocess
    import sys
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    from tests.conftest import free_port
    from trainer.checkpoint import read_checkpoint

    secret = "hunter2-SECRET"
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=digits_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/index.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        db = tmp_path / "mlflow.db"
        r = run_cli("train", "--config", "configs/dcgan_digits.yaml", f"data.train=http://alice:{secret}@127.0.0.1:{port}",
                    f"run.dir={tmp_path}/run", "train.max_steps=2", "train.batch_size=16", "checkpoint.every_steps=2",
                    "log.every_steps=1", "log.sample_every_steps=2", "log.prometheus_port=0", f"log.mlflow_uri=sqlite:///{db}")
    finally:
        server.terminate()
        server.wait(10)
    assert r.returncode == 0, r.stderr
    assert secret not in r.stdout + r.stderr
    assert secret not in open(tmp_path / "run" / "config.yaml").read()
    assert "alice:***@127.0.0.1" in open(tmp_path / "run" / "config.yaml").read()
    checkpoints = tmp_path / "run" / "checkpoints"
    for name in os.listdir(checkpoints):
        if name.startswith("step"):
            assert secret not in repr(read_checkpoint(str(checkpoints / name))["config"])
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file() and path.suffix in (".pt", ".yaml", ".json", ".jsonl", ".txt"):
            assert secret.encode() not in path.read_bytes(), path
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("ganforge").experiment_id])
    assert run.data.params["data.train"] == f"http://alice:***@127.0.0.1:{port}"
    assert not any(secret in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])
