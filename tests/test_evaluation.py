"""Evaluation: FID/KID/precision-recall against independent computations, mode and class coverage,
Inception weight loading, world-size independence and `ganforge eval` on real runs."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import scipy.linalg
import torch

from tests.conftest import run_cli
from trainer.evaluation.errors import EvaluationError
from trainer.evaluation.fid import fid
from trainer.evaluation.kid import kid
from trainer.evaluation.precision_recall import knn_radii, precision_recall


def gaussian(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift)


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root, independent of torchmetrics."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


# -- FID ----------------------------------------------------------------------------------------
def test_fid_matches_scipy_sqrtm_reference_within_1e_3():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(600, 24)) @ rng.normal(size=(24, 24))
    b = rng.normal(size=(500, 24)) @ rng.normal(size=(24, 24)) + 0.5
    ours, ref = fid(torch.from_numpy(a), torch.from_numpy(b)), scipy_fid(a, b)
    assert ref > 1.0
    assert abs(ours - ref) / ref < 1e-3


def test_fid_approaches_the_closed_form_for_diagonal_gaussians():
    # N(0, diag(s1^2)) vs N(m, diag(s2^2)): FID = |m|^2 + sum (s1 - s2)^2
    d = 4
    s1, s2, m = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, 1.5, 3.0]), torch.tensor([1.0, 0, 0, -2.0])
    a = gaussian(50_000, d, 1) * s1
    b = gaussian(50_000, d, 2) * s2 + m
    expected = float((m ** 2).sum() + ((s1 - s2) ** 2).sum())  # 5 + 6.25 = 11.25
    assert fid(a, b) == pytest.approx(expected, rel=0.02)


def test_fid_of_a_split_dataset_is_near_zero_and_grows_monotonically_with_noise():
    real = gaussian(4000, 16, 3)
    half_a, half_b = real[:2000], real[2000:]
    base = fid(half_a, half_b)
    noisy = [fid(half_a, half_b + gaussian(2000, 16, 4) * s) for s in (0.5, 1.0, 2.0, 4.0)]
    assert base < 0.01 * 16  # only the finite-sample bias, against a total variance of 16
    assert all(x < y for x, y in zip([base, *noisy], noisy, strict=False))


# -- KID ----------------------------------------------------------------------------------------
def test_kid_is_unbiased_for_equal_distributions_where_the_biased_estimate_is_not():
    draws, biased = [], []
    for seed in range(30):
        x, y = gaussian(100, 8, 2 * seed), gaussian(100, 8, 2 * seed + 1)
        draws.append(kid(x, y, subsets=1, subset_size=100, seed=seed)[0])
        k = lambda u, v: (u @ v.T / 8 + 1) ** 3  # noqa: E731 - the KID kernel, written out
        biased.append(float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()))
    mean, sem = np.mean(draws), np.std(draws, ddof=1) / math.sqrt(len(draws))
    assert abs(mean) < 3 * sem  # zero in expectation
    assert np.mean(biased) > 10 * sem  # the V-statistic (diagonal kept) sits clearly above zero


def test_kid_separates_shifted_distributions_and_is_fixed_by_its_seed():
    x, y = gaussian(500, 8, 0), gaussian(500, 8, 1, shift=0.5)
    a, b = kid(x, y, subsets=10, subset_size=200, seed=7), kid(x, y, subsets=10, subset_size=200, seed=7)
    assert a == b
    same = kid(x, gaussian(500, 8, 2), subsets=10, subset_size=200, seed=7)[0]
    assert a[0] > 10 * abs(same)


# -- precision / recall -------------------------------------------------------------------------
def test_knn_radius_is_the_distance_to_the_kth_other_point():
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    assert knn_radii(pts, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(pts, k=2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_precision_recall_near_one_for_the_same_distribution_and_zero_for_disjoint_ones():
    real, fake = gaussian(2000, 4, 0), gaussian(2000, 4, 1)
    p, r = precision_recall(real, fake)
    assert p > 0.9 and r > 0.9
    assert precision_recall(real, gaussian(2000, 4, 2, shift=50.0)) == (0.0, 0.0)


def test_dropping_half_the_modes_keeps_precision_and_halves_recall():
    left, right = gaussian(1000, 2, 0, shift=-20.0), gaussian(1000, 2, 1, shift=20.0)
    real = torch.cat([left, right])
    p, r = precision_recall(real, gaussian(1000, 2, 2, shift=-20.0))
    assert p > 0.9
    assert 0.4 < r < 0.55


# -- mode and class coverage -------------------------------------------------------------------
def test_mode_metrics_count_covered_modes_and_good_samples_on_constructed_points():
    from data_pipeline.sources import mixture_centres
    from trainer.evaluation.modes import mode_metrics

    centres, std = mixture_centres("grid25")
    rng = np.random.default_rng(0)
    near = np.repeat(centres[:20], 45, axis=0) + rng.uniform(-2 * std, 2 * std, (900, 2))  # 20 of 25 modes
    far = np.repeat(centres[:1], 100, axis=0) + 1.0  # 1.0 > 3 std from every centre
    m = mode_metrics(np.concatenate([near, far]), "grid25")
    assert m == {"modes_covered": 20, "modes_total": 25, "high_quality": pytest.approx(0.9)}
    ring, _ = mixture_centres("ring8")
    assert mode_metrics(ring[[0, 2, 4]], "ring8") == {"modes_covered": 3, "modes_total": 8, "high_quality": 1.0}


def test_class_coverage_kl_is_zero_when_uniform_and_log_k_when_one_class_takes_all():
    from trainer.evaluation.class_coverage import class_coverage

    uniform = torch.eye(10).repeat(30, 1) * 20  # confident, each class 30 times
    c = class_coverage(uniform, 10)
    assert c["class_kl"] == pytest.approx(0.0, abs=1e-12) and c["classes_covered"] == 10
    one = torch.zeros(300, 10)
    one[:, 3] = 20
    c = class_coverage(one, 10)
    assert c["class_kl"] == pytest.approx(math.log(10)) and c["classes_covered"] == 1
    assert c["class_histogram"][3] == 1.0


# -- sharding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 249, 250, 601, 1000])
def test_every_generated_sample_belongs_to_exactly_one_rank(n):
    from trainer.evaluation.sharding import rank_chunks

    for world in range(1, 5):
        got = sorted(i for r in range(world) for a, b in rank_chunks(n, 250, world, r) for i in range(a, b))
        assert got == list(range(n))


# -- evaluate() on a generator module (what the training loop calls) ---------------------------
class ModeHopper(torch.nn.Module):
    """A stand-in generator for 2-D data: sends latent i to one of the first `modes` grid centres."""

    def __init__(self, modes: int):
        super().__init__()
        from data_pipeline.sources import mixture_centres

        self.register_buffer("centres", torch.tensor(mixture_centres("grid25")[0][:modes], dtype=torch.float32))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        pick = (z[:, 0].abs() * 1000).long() % len(self.centres)
        return self.centres[pick] + 0.05 * z.clamp(-2, 2)  # the data's spread, within 3 std


@pytest.fixture(scope="module")
def grid25_dir(tmp_path_factory) -> str:
    from data_pipeline.sources import gaussians_source
    from data_pipeline.writer import write_shards

    out = str(tmp_path_factory.mktemp("grid25"))
    src = gaussians_source("grid25", 3000, seed=0)
    write_shards(src.samples, out, kind=src.kind, meta=src.meta, samples_per_shard=1000)
    return out


@pytest.mark.parametrize("modes", [25, 5])
def test_evaluate_a_generator_module_on_points_counts_its_modes(grid25_dir, tmp_path, modes):
    from trainer.config import Config
    from trainer.evaluation.evaluator import evaluate

    cfg = Config()
    cfg.model.z_dim, cfg.data.train, cfg.run.dir = 2, grid25_dir, str(tmp_path / "run")
    out = evaluate(ModeHopper(modes), "modes,fid,pr", 1000, cfg=cfg, log=lambda _: None)
    assert out["features"] == "points" and out["world_size"] == 1
    assert (out["modes_covered"], out["modes_total"], out["high_quality"]) == (modes, 25, 1.0)
    assert out["precision"] > 0.9  # every sample sits on a real mode
    assert out["recall"] > 0.9 if modes == 25 else out["recall"] < 0.3
    assert os.path.exists(os.path.join(tmp_path, "eval_cache"))  # real features cached beside the run


def test_bad_metric_names_are_refused_in_one_line(tmp_path):
    res = run_cli("eval", "--run", str(tmp_path), "--metrics", "fid,bogus")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == ["ganforge: error: --metrics: unknown metric 'bogus' "
                                               "(choose from fid, kid, pr, modes, classes, stacked, psnr, ssim)"]


# -- Inception weights --------------------------------------------------------------------------
@pytest.mark.parametrize("classes", [1000, 1008])
def test_inception_weights_file_loads_and_gives_2048_pool_features(tmp_path, classes):
    from torchvision.models import inception_v3

    from trainer.evaluation.inception import _FIDInceptionE, load_inception

    torch.manual_seed(0)
    # torchvision's layout (with aux logits, as its ImageNet file has) or the 1008-class FID layout
    net = inception_v3(weights=None, aux_logits=classes == 1000, num_classes=classes, init_weights=True)
    path = str(tmp_path / "inception.pth")
    torch.save(net.state_dict(), path)
    ext = load_inception(path)
    assert ext.key.startswith("inception-fid" if classes == 1008 else "inception-imagenet")
    assert isinstance(ext.net.Mixed_7c, _FIDInceptionE) == (classes == 1008)
    images = torch.rand(3, 1, 32, 32) * 2 - 1
    feats = ext(images)
    assert feats.shape == (3, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()
    assert torch.equal(feats, ext(images))  # eval mode: no batch statistics, no dropout
    assert not torch.equal(feats[0], feats[1])


def test_missing_or_foreign_inception_weights_are_named_in_one_line(tmp_path):
    from trainer.evaluation.inception import load_inception

    with pytest.raises(EvaluationError, match="no such file.*nowhere.pth"):
        load_inception(str(tmp_path / "nowhere.pth"))
    other = str(tmp_path / "other.pt")
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(EvaluationError, match="other.pt: not an Inception-v3 state dict"):
        load_inception(other)
    bad = str(tmp_path / "bad.pt")
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, bad)
    with pytest.raises(EvaluationError, match="bad.pt: Inception-v3 weights do not match"):
        load_inception(bad)


# -- runs: the acceptance and world-size independence --------------------------------------------
TRAIN = ["log.mlflow_uri=none", "checkpoint.every_steps=1000", "log.sample_every_steps=1000"]


@pytest.fixture(scope="module")
def digit_runs(digits_dir, tmp_path_factory) -> dict[str, str]:
    """A briefly trained and an untrained DCGAN on digits, side by side (sharing the eval cache)."""
    root = tmp_path_factory.mktemp("evalruns")
    runs = {"trained": (str(root / "trained"), 100), "untrained": (str(root / "untrained"), 1)}
    for run_dir, steps in runs.values():
        res = run_cli("train", "--config", "configs/dcgan_digits.yaml", f"data.train={digits_dir}",
                      f"run.dir={run_dir}", f"train.max_steps={steps}", *TRAIN,
                      env={"OMP_NUM_THREADS": "2"})
        assert res.returncode == 0, res.stderr[-2000:]
    return {name: path for name, (path, _) in runs.items()}


def eval_json(*args: str) -> dict:
    res = run_cli("eval", *args, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1, res.stdout  # one JSON object, nothing else on stdout
    # rank 0's share of the generated samples, shown as progress (a bar on a terminal, else a line)
    assert re.search(r"INFO ganforge: generate \+ features: (\d+)/\1 images \(100%\)", res.stderr), res.stderr
    return json.loads(lines[0])


@pytest.mark.slow
def test_trained_digits_run_has_a_finite_fid_below_the_untrained_one(digit_runs, digits_dir):
    from data_pipeline import load_index

    trained = eval_json("--run", digit_runs["trained"], "--metrics", "fid", "--n", "1000")
    untrained = eval_json("--run", digit_runs["untrained"], "--metrics", "fid", "--n", "1000")
    assert math.isfinite(trained["fid"]) and math.isfinite(untrained["fid"])
    assert trained["fid"] < 0.75 * untrained["fid"]
    assert trained["features"] == untrained["features"]
    # the classifier was trained once, on the run's own shards, and cached under their fingerprint
    cache = os.path.join(os.path.dirname(digit_runs["trained"]), "eval_cache")
    fingerprint = load_index(digits_dir).fingerprint()
    assert os.listdir(cache) and all(fingerprint in name for name in os.listdir(cache))
    assert trained["classifier_accuracy"] > 0.9


@pytest.mark.slow
def test_two_process_evaluation_equals_single_process(digit_runs):
    args = ["--run", digit_runs["trained"], "--metrics", "fid,kid,pr,modes", "--n", "600"]
    one = eval_json(*args)
    two = eval_json(*args, "--nproc", "2")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for key in ("fid", "kid", "precision", "recall", "class_kl", "modes_covered", "modes_total", "high_quality"):
        assert two[key] == pytest.approx(one[key], rel=1e-6, abs=1e-9), key
    assert 0.0 <= one["high_quality"] <= 1.0 and one["modes_total"] == 10


@pytest.mark.slow
def test_a_failure_on_rank_zero_stops_every_rank_with_one_line(digit_runs, tmp_path):
    missing = str(tmp_path / "missing_inception.pth")
    res = run_cli("eval", "--run", digit_runs["trained"], "--metrics", "fid", "--nproc", "2",
                  "--features", "inception", "--inception-weights", missing, timeout=300)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("ganforge:")]
    assert errors == [f"ganforge: error: eval.inception_weights: no such file {missing!r} "
                      "(see docs/evaluation.md for where to get the FID Inception weights)"]


class _Replay(torch.nn.Module):
    """A 'generator' that returns given images in order, whatever its latents."""

    def __init__(self, images: torch.Tensor):
        super().__init__()
        self.images, self.at = images, 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.images[self.at:self.at + len(z)]
        self.at += len(z)
        return out


class _TinyFeatures(torch.nn.Module):
    """A small random CNN as feature extractor: what matters here is what reaches it."""

    key, num_features = "tiny-cnn", 16

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, 2, 1),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def test_generated_images_reach_the_extractor_as_8_bit_images_like_the_real_ones(digits_dir, tmp_path):
    from data_pipeline import load_index
    from trainer.distributed import DistEnv
    from trainer.evaluation.real_data import read_samples, real_subset
    from trainer.evaluation.real_stats import real_features
    from trainer.evaluation.sharding import generated_features

    index, n, extractor = load_index(digits_dir), 300, _TinyFeatures().eval()
    real_images = read_samples(index, real_subset(index, n))[0]
    # What a generator gives for the same pictures: off the 8-bit grid by up to 0.45 of a step,
    # and beyond [-1, 1] where the picture is black (StyleGAN2 outputs are not clamped).
    off_grid = real_images + (torch.rand(real_images.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.9 / 127.5
    off_grid[real_images == -1] = -1.2
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with torch.no_grad():
        real = real_features(index, extractor, n, str(tmp_path))
        fake = generated_features(_Replay(off_grid), extractor, n, 16, 0, env)
        unquantised = extractor(off_grid).double()
    assert torch.equal(fake, real)  # the same 8-bit images give the same features, bit for bit
    assert fid(real, fake) < 1e-6
    assert not torch.allclose(unquantised, real, atol=1e-4)  # without the 8 bits they differ
