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
