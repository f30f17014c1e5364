"""Data that disagrees with its index: other image sizes, channel counts, bit depths, labels out of range."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from data_pipeline import DataError, load_index
from data_pipeline.loader import ShardStream, StreamSpec, decode_samples, make_loader
from data_pipeline.writer import write_shards
from tests.conftest import run_cli

META = {"size": 16, "channels": 1, "image_ext": "png", "label_names": ["zero", "one"]}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def dataset(tmp_path, odd: bytes | None = None, odd_label: bytes = b"1", at: int = 5) -> str:
    """12 good 16x16 gray samples in shards of 4, sample `at` replaced by `odd` (and `odd_label`)."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(12):
        image = png(rng.integers(0, 255, (16, 16), dtype=np.uint8))
        samples.append((f"{i:04d}", {"png": odd if i == at and odd else image,
                                     "cls": odd_label if i == at else str(i % 2).encode()}))
    out = str(tmp_path / "data")
    write_shards(iter(samples), out, kind="image", meta=META, samples_per_shard=4)
    return out


def read_all(directory: str, on_error: str = "raise") -> list[dict]:
    stream = ShardStream(directory, StreamSpec(seed=0, batch_size=12, on_error=on_error))
    return list(make_loader(stream))


ODD_IMAGES = {
    "size": (png(np.zeros((20, 16), np.uint8)), "16x20"),
    "bit depth": (png(np.full((16, 16), 40000, np.uint16)), "16-bit"),
}


@pytest.mark.parametrize("what", sorted(ODD_IMAGES))
def test_an_image_that_disagrees_with_the_index_is_a_data_error_naming_shard_and_key(tmp_path, what):
    odd, words = ODD_IMAGES[what]
    data = dataset(tmp_path, odd)
    with pytest.raises(DataError, match=f"000001.tar: key 0005: .*{words}"):
        read_all(data)


@pytest.mark.parametrize("what", sorted(ODD_IMAGES))
def test_on_error_skip_skips_an_image_that_disagrees_with_the_index(tmp_path, what):
    data = dataset(tmp_path, ODD_IMAGES[what][0])
    (batch,) = read_all(data, on_error="skip")
    assert batch["image"].dtype.itemsize == 1 and batch["image"].shape == (12, 1, 16, 16)
    assert int(batch["skipped"]) == 1


@pytest.mark.parametrize("what", sorted(ODD_IMAGES))
def test_verify_reports_an_image_that_disagrees_with_the_index(tmp_path, what):
    odd, words = ODD_IMAGES[what]
    r = run_cli("data", "verify", dataset(tmp_path, odd))
    assert r.returncode == 1
    assert "000001.tar: key 0005" in r.stderr and words in r.stderr, r.stderr


def test_make_shards_scales_16_bit_images_to_8_bit(tmp_path):
    os.makedirs(tmp_path / "imgs")
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(tmp_path / "imgs" / "deep.png")  # 128 * 257
    r = run_cli("data", "make-shards", "--source", "folder", "--input", str(tmp_path / "imgs"), "--size", "16",
                "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    (sample,) = decode_samples(load_index(str(tmp_path / "out")), [0])
    assert sample["image"].dtype.itemsize == 1 and sample["image"].unique().tolist() == [128]


def test_make_shards_refuses_a_float_image_in_one_line_naming_the_file(tmp_path):
    os.makedirs(tmp_path / "imgs")
    Image.fromarray(np.full((16, 16), 0.5, np.float32)).save(tmp_path / "imgs" / "float.tif")
    r = run_cli("data", "make-shards", "--source", "folder", "--input", str(tmp_path / "imgs"), "--size", "16",
                "--out", str(tmp_path / "out"))
    assert r.returncode == 1 and "float.tif" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_make_shards_refuses_a_label_outside_the_label_names(tmp_path):
    with pytest.raises(DataError, match="key 0005: label 2 .*2 label names"):
        dataset(tmp_path, odd_label=b"2")
    with pytest.raises(DataError, match="key 0005: label 'x' "):
        dataset(tmp_path, odd_label=b"x")


def test_a_label_outside_the_label_names_in_the_shards_is_a_data_error(tmp_path):
    data = dataset(tmp_path)
    import json

    index = json.load(open(os.path.join(data, "index.json")))
    index["meta"]["label_names"] = ["zero"]  # an index written elsewhere, claiming one class
    json.dump(index, open(os.path.join(data, "index.json"), "w"))
    with pytest.raises(DataError, match=r"\d{6}.tar: key \d{4}: label 1 is outside .*1 label names"):
        read_all(data)


def test_training_a_conditional_model_on_more_classes_than_it_has_stops_before_it_starts(tmp_path, digits_dir):
    r = run_cli("train", "--config", "configs/dcgan_digits_cond.yaml", f"data.train={digits_dir}",
                f"run.dir={tmp_path}/run", "model.num_classes=5", "train.max_steps=1", "log.mlflow_uri=none")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "model.num_classes" in line and digits_dir in line and "10 classes" in line
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
