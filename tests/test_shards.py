"""Shard writer, index, verify and the loader's handling of good and bad data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from data_pipeline import DataError, load_index
from data_pipeline.loader import ShardStream, StreamSpec, make_loader
from data_pipeline.planner import epoch_order, plan_rank
from data_pipeline.verify import verify_index
from tests.conftest import run_cli


def read_all(directory: str, **spec) -> list[dict[str, torch.Tensor]]:
    workers = spec.pop("workers", 0)
    stream = ShardStream(directory, StreamSpec(**{"seed": 0, "batch_size": 8, "drop_last": False, **spec}))
    return list(make_loader(stream, num_workers=workers))


def test_round_trip_gives_back_the_source_pixels_and_labels(tmp_path):
    from sklearn.datasets import load_digits

    from data_pipeline.sources import digits_source
    from data_pipeline.writer import write_shards

    src = digits_source(size=8)  # 8x8: no resampling, so pixels must match exactly
    index = write_shards(src.samples, str(tmp_path), kind=src.kind, meta=src.meta, samples_per_shard=500)
    assert [s.num_samples for s in index.shards] == [500, 500, 500, 297]
    d = load_digits()
    expected = (d.images * 255 / 16).round().astype(np.uint8)
    order = epoch_order([s.num_samples for s in index.shards], 0, 0)
    got = torch.cat([b["image"] for b in read_all(str(tmp_path))])
    labels = torch.cat([b["label"] for b in read_all(str(tmp_path))])
    assert got.dtype == torch.uint8 and got.shape == (1797, 1, 8, 8)
    assert np.array_equal(got[:, 0].numpy(), expected[order])
    assert np.array_equal(labels.numpy(), d.target[order])


def test_index_records_member_offsets_that_point_at_the_payload(small_dir):
    index = load_index(small_dir)
    shard = index.shards[2]
    data = open(os.path.join(small_dir, shard.name), "rb").read()
    assert len(data) == shard.bytes
    for rec in shard.samples:
        off, size, _ = rec.members["png"]
        assert data[off:off + 8] == b"\x89PNG\r\n\x1a\n"
        assert data[rec.members["cls"][0]:rec.members["cls"][0] + rec.members["cls"][1]].isdigit()


def test_webdataset_reads_the_shards_as_plain_tar(small_dir):
    import webdataset as wds

    urls = sorted(os.path.join(small_dir, n) for n in os.listdir(small_dir) if n.endswith(".tar"))
    keys = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == load_index(small_dir).keys()


def test_loader_order_does_not_depend_on_workers(small_dir):
    base = [b["position"].tolist() for b in read_all(small_dir, rank=1, world_size=2)]
    for workers in (1, 2, 3):
        assert [b["position"].tolist() for b in read_all(small_dir, rank=1, world_size=2, workers=workers)] == base


def test_loader_reads_what_the_plan_says(small_dir):
    index = load_index(small_dir)
    order = epoch_order([s.num_samples for s in index.shards], 5, 2)
    stream = ShardStream(small_dir, StreamSpec(seed=5, rank=2, world_size=3, batch_size=4, drop_last=False))
    stream.set_position(epoch=2, start=13)
    got = torch.cat([b["label"] for b in make_loader(stream)]).tolist()
    planned = [e.sample for e in plan_rank(order, 3, 2, start=13)]
    labels = [int(index.locate(s)[1].key) for s in planned]  # keys are the source order of load_digits
    from sklearn.datasets import load_digits

    assert got == [int(load_digits().target[k]) for k in labels]


def test_flips_are_fixed_by_seed_and_epoch(small_dir):
    a = torch.cat([b["image"] for b in read_all(small_dir, flip=True)])
    b = torch.cat([b["image"] for b in read_all(small_dir, flip=True)])
    plain = torch.cat([b["image"] for b in read_all(small_dir)])
    assert torch.equal(a, b)
    flipped = [not torch.equal(x, y) for x, y in zip(a, plain, strict=True)]
    assert 0 < sum(flipped) < len(flipped)
    assert all(torch.equal(x, y.flip(-1)) for x, y, f in zip(a, plain, flipped, strict=True) if f)


def test_verify_names_shard_and_key_after_one_byte_changes(small_dir):
    index = load_index(small_dir)
    shard = index.shards[3]
    rec = shard.samples[4]
    off, size, _ = rec.members["png"]
    path = os.path.join(small_dir, shard.name)
    data = bytearray(open(path, "rb").read())
    data[off + size // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    r = run_cli("data", "verify", small_dir)
    assert r.returncode != 0
    assert shard.name in r.stderr and rec.key in r.stderr
    with pytest.raises(DataError, match=f"{shard.name}: key {rec.key}"):
        read_all(small_dir)


def test_verify_passes_on_intact_data(small_dir):
    assert verify_index(load_index(small_dir)) == []
    assert run_cli("data", "verify", small_dir).returncode == 0


def test_truncated_shard_is_reported_before_training(small_dir):
    path = os.path.join(small_dir, "000001.tar")
    os.truncate(path, os.path.getsize(path) - 700)
    with pytest.raises(DataError, match="000001.tar: size"):
        ShardStream(small_dir, StreamSpec(seed=0))
    problems = verify_index(load_index(small_dir))
    assert any("000001.tar" in p for p in problems)


def test_missing_shard_is_named(small_dir):
    os.remove(os.path.join(small_dir, "000004.tar"))
    with pytest.raises(DataError, match="000004.tar: missing shard"):
        ShardStream(small_dir, StreamSpec(seed=0))


def test_corrupt_image_is_skipped_and_counted_with_on_error_skip(small_dir, caplog):
    index = load_index(small_dir)
    shard, rec = index.shards[0], index.shards[0].samples[1]
    off, size, _ = rec.members["png"]
    path = os.path.join(small_dir, shard.name)
    data = bytearray(open(path, "rb").read())
    data[off + 20:off + size] = b"\0" * (size - 20)  # destroy the PNG body
    open(path, "wb").write(bytes(data))
    # Re-index the damaged payload's crc so the failure happens at decode time, not at read time.
    doc = json.load(open(os.path.join(small_dir, "index.json")))
    import zlib

    doc["shards"][0]["samples"][1]["members"]["png"][2] = zlib.crc32(bytes(data[off:off + size]))
    json.dump(doc, open(os.path.join(small_dir, "index.json"), "w"))
    with pytest.raises(DataError, match=f"{shard.name}: key {rec.key}: cannot decode"):
        read_all(small_dir)
    batches = read_all(small_dir, on_error="skip")
    assert sum(int(b["skipped"]) for b in batches) == 1
    assert sum(len(b["image"]) for b in batches) == index.num_samples  # batch sizes unchanged
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{shard.name}: key {rec.key}" in warning


def test_empty_or_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="missing index"):
        load_index(str(tmp_path))
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_index(str(tmp_path))
    with pytest.raises(DataError, match="no such shard directory"):
        load_index(str(tmp_path / "nope"))


def test_writer_refuses_to_overwrite_a_dataset(small_dir):
    before = open(os.path.join(small_dir, "index.json")).read()
    r = run_cli("data", "make-shards", "--source", "digits", "--out", small_dir)
    assert r.returncode != 0 and "already holds a dataset" in r.stderr
    assert open(os.path.join(small_dir, "index.json")).read() == before


def test_gaussians_and_folder_and_paired_sources(tmp_path):
    from PIL import Image

    r = run_cli("data", "make-shards", "--source", "gaussians", "--mixture", "ring8", "--n", "500",
                "--out", str(tmp_path / "g"))
    assert r.returncode == 0, r.stderr
    pts = torch.cat([b["points"] for b in read_all(str(tmp_path / "g"))])
    assert pts.shape == (500, 2)
    assert torch.allclose(pts.norm(dim=1), torch.ones(500), atol=0.06)

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        os.makedirs(tmp_path / "imgs" / cls)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.jpg")
    r = run_cli("data", "make-shards", "--source", "folder", "--input", str(tmp_path / "imgs"), "--size", "16",
                "--out", str(tmp_path / "f"))
    assert r.returncode == 0, r.stderr
    batch = read_all(str(tmp_path / "f"))[0]
    assert batch["image"].shape == (6, 3, 16, 16)
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 1, 1, 1]

    for side in "AB":
        os.makedirs(tmp_path / "pairs" / side)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "pairs" / side / f"x{i}.png")
    r = run_cli("data", "make-shards", "--source", "paired", "--input", str(tmp_path / "pairs"), "--size", "16",
                "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    batch = read_all(str(tmp_path / "p"))[0]
    assert batch["a"].shape == batch["b"].shape == (4, 3, 16, 16)
    os.remove(tmp_path / "pairs" / "B" / "x2.png")
    r = run_cli("data", "make-shards", "--source", "paired", "--input", str(tmp_path / "pairs"), "--out", str(tmp_path / "p2"))
    assert r.returncode == 1 and "x2" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_http_streaming_from_a_local_server(small_dir):
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.conftest import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=small_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/index.json", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        remote = torch.cat([b["image"] for b in read_all(url, rank=0, world_size=2)])
        local = torch.cat([b["image"] for b in read_all(small_dir, rank=0, world_size=2)])
        assert torch.equal(remote, local)
    finally:
        server.terminate()
        server.wait(10)


def test_force_over_a_dataset_keeps_the_old_one_when_the_new_source_fails_half_way(tmp_path):
    from PIL import Image

    old = str(tmp_path / "data")
    assert run_cli("data", "make-shards", "--source", "gaussians", "--n", "50", "--out", old).returncode == 0
    before = open(os.path.join(old, "index.json")).read()
    rng = np.random.default_rng(0)
    os.makedirs(tmp_path / "imgs" / "a")
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    (tmp_path / "imgs" / "a" / "7.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")  # after the good ones

    r = run_cli("data", "make-shards", "--source", "folder", "--input", str(tmp_path / "imgs"), "--size", "16",
                "--samples-per-shard", "2", "--out", old, "--force")
    assert r.returncode == 1 and "7.png" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert open(os.path.join(old, "index.json")).read() == before
    assert run_cli("data", "verify", old).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["data", "imgs"]  # no build folder left behind

    r = run_cli("data", "make-shards", "--source", "digits", "--out", old, "--force")
    assert r.returncode == 0, r.stderr
    assert load_index(old).meta["source"] == "digits" and run_cli("data", "verify", old).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["data", "imgs"]


def test_force_onto_a_mount_point_swaps_file_by_file(small_dir, monkeypatch):
    import errno

    from data_pipeline import writer
    from data_pipeline.sources import gaussians_source

    real_rename = os.rename

    def rename(src, dst):
        if os.path.realpath(src) == os.path.realpath(small_dir):
            raise OSError(errno.EBUSY, "Device or resource busy")  # what a mount point answers
        real_rename(src, dst)

    monkeypatch.setattr(writer.os, "rename", rename)
    (open(os.path.join(small_dir, "README"), "w")).write("kept")
    src = gaussians_source(n=30)
    writer.write_shards(src.samples, small_dir, kind=src.kind, meta=src.meta, samples_per_shard=10, force=True)
    assert sorted(os.listdir(small_dir)) == ["000000.tar", "000001.tar", "000002.tar", "README", "index.json"]
    assert load_index(small_dir).kind == "points" and verify_index(load_index(small_dir)) == []
    assert sorted(os.listdir(os.path.dirname(small_dir))) == ["small"]
