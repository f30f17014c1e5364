"""Stacked MNIST: the shard source's channel stacking and labels, and the PacGAN mode metric on
real stacked images read as if generated, on one repeated triple, and through `ganforge eval`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from trainer.evaluation.errors import EvaluationError

N_DATA = 3000


def write_stacked(out: str, n: int, seed: int = 0) -> str:
    from data_pipeline.sources import stacked_mnist_source
    from data_pipeline.writer import write_shards

    src = stacked_mnist_source(32, n, seed)
    write_shards(src.samples, out, kind=src.kind, meta=src.meta, samples_per_shard=500)
    return out


@pytest.fixture(scope="module")
def stacked_dir(tmp_path_factory) -> str:
    return write_stacked(str(tmp_path_factory.mktemp("stacked")), N_DATA)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("eval_cache"))


@pytest.fixture(scope="module")
def extractor(stacked_dir, cache_dir):
    from data_pipeline import load_index
    from trainer.evaluation.stacked_mnist import load_stacked_features

    return load_stacked_features(load_index(stacked_dir), cache_dir, log=lambda _: None)


@pytest.fixture(scope="module")
def real(stacked_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """All real stacked images in [-1, 1] and their mode labels."""
    from data_pipeline import load_index
    from trainer.evaluation.real_data import read_samples

    index = load_index(stacked_dir)
    return read_samples(index, np.arange(index.num_samples))


# -- the source ----------------------------------------------------------------------------------
def test_each_channel_is_the_drawn_mnist_digit_and_the_label_is_the_triple(stacked_dir):
    from data_pipeline import load_index
    from data_pipeline.loader import ShardReader, decode_sample
    from data_pipeline.sources import mnist_digits, stacked_triples

    index = load_index(stacked_dir)
    assert index.num_samples == N_DATA and index.meta["channels"] == 3 and index.meta["stacked"] is True
    assert index.meta["num_classes"] == 1000 and len(index.meta["label_names"]) == 1000
    digits, labels = mnist_digits(32)
    triples = stacked_triples(len(digits), N_DATA, seed=0)
    reader = ShardReader(index)
    try:
        for i in (0, 1, 777, N_DATA - 1):
            sample = decode_sample(index.kind, index.meta, reader.read(i)[2])
            assert sample["image"].shape == (3, 32, 32)
            for c in range(3):
                assert np.array_equal(sample["image"][c].numpy(), digits[triples[i, c]])
            r, g, b = labels[triples[i]]
            assert int(sample["label"]) == 100 * r + 10 * g + b
    finally:
        reader.close()


def test_the_draw_is_fixed_by_its_seed(tmp_path):
    from data_pipeline import load_index

    a = load_index(write_stacked(str(tmp_path / "a"), 40, seed=1)).fingerprint()
    b = load_index(write_stacked(str(tmp_path / "b"), 40, seed=1)).fingerprint()
    c = load_index(write_stacked(str(tmp_path / "c"), 40, seed=2)).fingerprint()
    assert a == b != c


def test_make_shards_and_inspect_handle_a_thousand_labels(tmp_path):
    out = str(tmp_path / "sm")
    res = run_cli("data", "make-shards", "--source", "stacked_mnist", "--n", "300", "--out", out)
    assert res.returncode == 0, res.stderr
    res = run_cli("data", "inspect", out)
    assert res.returncode == 0, res.stderr
    assert "label_names: 1000 items ['000', '001', '002', ..., '999']" in res.stdout
    label_lines = [line for line in res.stdout.splitlines() if line.startswith("labels:")]
    assert len(label_lines) == 1 and " of 1000 present" in label_lines[0]
    assert len(res.stdout.splitlines()) < 20


# -- the metric ----------------------------------------------------------------------------------
def one_hot_channels(digits: torch.Tensor) -> torch.Tensor:
    """Confident (N, 3, 10) logits for the given (N, 3) digits."""
    return torch.nn.functional.one_hot(digits, 10).float() * 20


def test_every_triple_once_covers_all_modes_with_zero_kl():
    from trainer.evaluation.stacked_mnist import stacked_mode_metrics

    modes = torch.arange(1000)
    m = stacked_mode_metrics(one_hot_channels(torch.stack([modes // 100, modes // 10 % 10, modes % 10], 1)))
    assert (m["modes_covered"], m["modes_total"], m["high_quality"], m["modes_high_quality"]) == (1000, 1000, 1.0, 1000)
    assert m["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert m["channel_kl"] == [0.0, 0.0, 0.0]


def test_joint_classes_are_the_triple_of_channel_digits(extractor, real):
    images, labels = real
    feats = extractor(images[:500])
    per_channel = extractor.channel_logits(feats).argmax(2)
    joint = extractor.classify(feats)
    assert joint.shape == (500, 1000)
    assert torch.equal(joint.argmax(1), per_channel[:, 0] * 100 + per_channel[:, 1] * 10 + per_channel[:, 2])
    assert torch.allclose(joint.exp().sum(1), torch.ones(500), atol=1e-4)


def test_real_stacked_samples_cover_the_modes_they_hold_with_low_kl(extractor, real):
    from trainer.evaluation.class_coverage import kl_to_uniform
    from trainer.evaluation.stacked_mnist import stacked_mode_metrics

    images, labels = real
    feats = extractor(images)
    m = stacked_mode_metrics(extractor.channel_logits(feats))
    held = len(torch.unique(labels))  # 3,000 uniform draws hold about 950 of the 1,000 triples
    true_kl = kl_to_uniform(torch.bincount(labels, minlength=1000))
    assert extractor.accuracy > 0.97  # held-out single-digit accuracy
    assert (extractor.classify(feats).argmax(1) == labels).float().mean() > 0.93
    assert held - 30 <= m["modes_covered"] <= held + 10 and m["modes_covered"] > 900
    assert abs(m["kl_uniform"] - true_kl) < 0.05 and m["kl_uniform"] < 0.25
    assert m["high_quality"] > 0.7 and max(m["channel_kl"]) < 0.02


def test_one_repeated_triple_is_one_mode_with_kl_log_1000(extractor, real):
    from trainer.evaluation.stacked_mnist import stacked_mode_metrics

    images, _ = real
    m = stacked_mode_metrics(extractor.channel_logits(extractor(images[:1].repeat(400, 1, 1, 1))))
    assert (m["modes_covered"], m["modes_total"]) == (1, 1000)
    assert m["kl_uniform"] == pytest.approx(math.log(1000))


# -- evaluate() and `ganforge eval` --------------------------------------------------------------
class RealStacked(torch.nn.Module):
    """A stand-in generator that returns real stacked images, picked by each latent."""

    def __init__(self, images: torch.Tensor, distinct: int):
        super().__init__()
        self.register_buffer("images", images[:distinct])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.images[(z[:, 0].abs() * 1e4).long() % len(self.images)]


def stacked_cfg(data: str, run_dir: str):
    from trainer.config import Config

    cfg = Config()
    cfg.model.z_dim, cfg.model.channels, cfg.data.train, cfg.run.dir = 8, 3, data, run_dir
    return cfg


def test_evaluate_counts_the_modes_of_a_generator_and_modes_means_stacked_here(stacked_dir, cache_dir, extractor,
                                                                               real, tmp_path):
    from trainer.evaluation.evaluator import evaluate
    from trainer.evaluation.stacked_mnist import stacked_mode_metrics
    from trainer.sampling import latents

    images, _ = real
    cfg = stacked_cfg(stacked_dir, str(tmp_path / "run"))
    g = RealStacked(images, N_DATA)
    out = evaluate(g, "stacked", 3000, cfg=cfg, cache_dir=cache_dir, log=lambda _: None)
    assert out["features"].startswith("stacked-digits-") and out["mode_samples"] == out["n"] == 3000
    assert out["classifier_accuracy"] > 0.97
    # the same as reading the generator's 3,000 samples (about 1,900 distinct images) directly
    expected = stacked_mode_metrics(extractor.channel_logits(extractor(g(latents(0, 3000, 8)))))
    assert out["modes_covered"] == expected["modes_covered"] > 800 and out["modes_total"] == 1000
    assert out["kl_uniform"] == pytest.approx(expected["kl_uniform"], abs=1e-9)
    modes = evaluate(g, "modes", 3000, cfg=cfg, cache_dir=cache_dir, log=lambda _: None)
    assert {k: modes[k] for k in ("modes_covered", "kl_uniform", "high_quality")} == \
        {k: out[k] for k in ("modes_covered", "kl_uniform", "high_quality")}
    few = evaluate(RealStacked(images, 5), "stacked", 1000, cfg=cfg, cache_dir=cache_dir, log=lambda _: None)
    assert few["modes_covered"] <= 5 and few["kl_uniform"] > math.log(1000 / 5) - 0.1


def test_stacked_metric_on_other_data_is_refused_in_one_line(digits_dir, cache_dir, tmp_path):
    from trainer.evaluation.evaluator import evaluate

    cfg = stacked_cfg(digits_dir, str(tmp_path / "run"))
    with pytest.raises(EvaluationError, match=r"--metrics stacked: .* is not a Stacked-MNIST dataset \(source 'digits'\)"):
        evaluate(RealStacked(torch.zeros(1, 3, 32, 32), 1), "stacked", 100, cfg=cfg, cache_dir=cache_dir)


def test_ganforge_eval_reports_stacked_modes_as_json(stacked_dir, cache_dir, tmp_path):
    run = str(tmp_path / "run")
    res = run_cli("train", "--config", "configs/dcgan_stacked_mnist.yaml", f"data.train={stacked_dir}",
                  f"run.dir={run}", "train.max_steps=2", "train.threads=1", "log.mlflow_uri=none",
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli("eval", "--run", run, "--metrics", "stacked", "--n", "500", "--cache-dir", cache_dir, "--json",
                  env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip())
    assert out["modes_total"] == 1000 and 1 <= out["modes_covered"] <= 500 and out["step"] == 2
    assert 0.0 <= out["kl_uniform"] <= math.log(1000) + 1e-9 and out["mode_samples"] == 500
