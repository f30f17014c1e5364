"""s3:// shards against a real S3-compatible server on 127.0.0.1: moto's standalone server
(`moto.server.ThreadedMotoServer`), found by boto3 through AWS_ENDPOINT_URL as any S3-compatible
store would be. Counts come from the client (moto does not count requests)."""

from __future__ import annotations

import os

import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.loader import FETCH_FIELDS, ShardStream, StreamSpec, make_loader

moto_server = pytest.importorskip("moto.server", reason="the dev extras install moto[server]")
boto3 = pytest.importorskip("boto3")


@pytest.fixture()
def bucket(digits_dir, monkeypatch):
    """The digits shards uploaded to s3://shards/digits on a moto server; yields the location."""
    from tests.conftest import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="shards")
    for name in os.listdir(digits_dir):
        s3.upload_file(os.path.join(digits_dir, name), "shards", f"digits/{name}")
    yield "s3://shards/digits"
    server.stop()


def test_s3_shards_are_cached_once_per_node_and_read_like_local_ones(digits_dir, bucket, tmp_path):
    spec = {"seed": 1, "batch_size": 32, "drop_last": False, "block_shards": 2}
    local = list(make_loader(ShardStream(digits_dir, StreamSpec(**spec)), num_workers=2))
    remote = list(make_loader(ShardStream(bucket, StreamSpec(**spec, cache_dir=str(tmp_path / "c"))), num_workers=2))
    assert len(local) == len(remote)
    for a, b in zip(local, remote, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["position"], b["position"])
    stats = dict(zip(FETCH_FIELDS, torch.stack([b["fetch"] for b in remote]).sum(0).tolist(), strict=True))
    dataset = sum(os.path.getsize(os.path.join(digits_dir, f)) for f in os.listdir(digits_dir) if f.endswith(".tar"))
    assert stats["cache_misses"] == 8 and stats["cache_hits"] == 8 and stats["requests"] == 8
    assert stats["bytes_fetched"] == dataset


def test_a_missing_s3_object_is_a_data_error_naming_shard_and_url(bucket, tmp_path):
    boto3.client("s3").delete_object(Bucket="shards", Key="digits/000003.tar")
    stream = ShardStream(bucket, StreamSpec(seed=0, batch_size=32, cache_dir=str(tmp_path / "c"), prefetch_shards=0))
    with pytest.raises(DataError, match=r"000003\.tar: cannot fetch s3://shards/digits/000003\.tar \(S3 NoSuchKey\)"):
        list(make_loader(stream))
