"""`ganforge export`: every family's generator in every format reloads in plain PyTorch or
onnxruntime and reproduces the run's generator; bad requests fail in one line and keep files."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import REPO, run_cli
from trainer.export import FORMATS, TOLERANCE, export_generator

pytestmark = pytest.mark.slow  # end to end: five `ganforge train` runs, then every family in every format

TINY = ["train.max_steps=2", "model.g_width=8", "model.d_width=8", "log.mlflow_uri=none", "train.threads=1"]
TRANSLATION = ["model.resolution=32", "model.n_blocks=1", "model.d_layers=2", "data.build="]
RECIPES = {
    "dcgan_cond": ("dcgan_digits_cond.yaml", ["model.z_dim=16", "train.batch_size=16"]),
    "stylegan2": ("stylegan2_digits.yaml", ["model.g_width=16", "model.d_width=16", "model.channel_base=256",
                                            "model.z_dim=32", "model.w_dim=32", "train.batch_size=8"]),
    "mlp": ("gan_ring8.yaml", ["model.depth=2", "train.batch_size=32"]),
    "cyclegan": ("cyclegan_sample_images.yaml", [*TRANSLATION, "train.batch_size=2"]),
    "pix2pix": ("pix2pix_edges.yaml", [*TRANSLATION, "train.batch_size=2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir, packaged) -> dict[str, str]:
    """A 2-step run of each family (tiny nets), trained once for the module."""
    root = tmp_path_factory.mktemp("export_runs")
    ring = str(root / "ring8")
    r = run_cli("data", "make-shards", "--source", "gaussians", "--mixture", "ring8", "--out", ring, "--n", "256")
    assert r.returncode == 0, r.stderr
    si, ep = packaged["si"], packaged["ep"]
    data = {"dcgan_cond": [f"data.train={digits_dir}"], "stylegan2": [f"data.train={digits_dir}"],
            "mlp": [f"data.train={ring}"],
            "cyclegan": [f"data.train={si}/trainA", f"data.train_b={si}/trainB", f"data.val={si}/testA",
                         f"data.val_b={si}/testB"],
            "pix2pix": [f"data.train={ep}/train", f"data.val={ep}/test"]}
    out = {}
    for family, (recipe, extra) in RECIPES.items():
        run = str(root / family)
        r = run_cli("train", "--config", os.path.join(REPO, "configs", recipe), f"run.dir={run}", *TINY, *extra,
                    *data[family], env={"OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, f"{family}: {r.stderr[-2000:]}"
        out[family] = run
    return out


def reference(run: str, direction: str | None):
    """(the run's generator as a function of plain tensors, inputs of 3 rows, their input names, config)."""
    from trainer.families import family
    from trainer.families.image_to_image import load_translator
    from trainer.generate import load_checkpoint_state, load_generator

    gen = torch.Generator().manual_seed(7)
    if family(load_checkpoint_state(run)[2].model.arch).command == "translate":
        g, cfg = load_translator(run, direction)
        m = cfg.model
        a, b = (torch.rand(3, m.channels, m.resolution, m.resolution, generator=gen) * 2 - 1 for _ in range(2))
        if m.arch == "cyclegan" and direction is None:
            return (lambda a, b: (g.g_ab(a), g.g_ba(b))), (a, b), ("a", "b"), cfg
        return g, (a,), ("image",), cfg
    g, cfg, _ = load_generator(run)
    z = torch.randn(3, cfg.model.z_dim, generator=gen)
    if cfg.model.num_classes:
        return g, (z, torch.tensor([0, 5, 9])), ("z", "labels"), cfg
    return g, (z,), ("z",), cfg


def load_and_run(path: str, fmt: str, inputs: tuple, names: tuple, direction: str | None) -> tuple:
    """What docs/export.md shows: each format loaded in plain PyTorch or onnxruntime."""
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        from trainer.config import from_dict
        from trainer.models import build_models

        with safe_open(path, "pt") as f:
            meta = f.metadata()
        g, _ = build_models(from_dict(json.loads(meta["ganforge.config"])).model)
        if meta["ganforge.part"]:
            assert meta["ganforge.part"] == {"AtoB": "g_ab", "BtoA": "g_ba"}[direction]
            g = g.get_submodule(meta["ganforge.part"])
        g.load_state_dict(load_file(path))
        g.eval()
        out = (g.g_ab(inputs[0]), g.g_ba(inputs[1])) if hasattr(g, "g_ab") else g(*inputs)
    elif fmt == "torchscript":
        out = torch.jit.load(path)(*inputs)
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})
    else:
        out = torch.export.load(path).module()(*inputs)
    return tuple(torch.as_tensor(o) for o in out) if isinstance(out, (tuple, list)) else (out,)


CASES = [("dcgan_cond", None), ("stylegan2", None), ("mlp", None), ("cyclegan", None), ("cyclegan", "BtoA"),
         ("pix2pix", None)]


@pytest.mark.parametrize("family,direction", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_reloads_and_matches_the_generator(runs, tmp_path, family, direction, fmt):
    out = str(tmp_path / f"g.{'pt2' if fmt == 'exported' else fmt}")
    diff = export_generator(runs[family], fmt, out, direction=direction)
    assert diff <= TOLERANCE and os.path.isfile(out)
    assert os.listdir(tmp_path) == [os.path.basename(out)]  # no partial file left behind
    g, inputs, names, _ = reference(runs[family], direction)
    with torch.no_grad():
        want = g(*inputs)
        want = want if isinstance(want, tuple) else (want,)
        got = load_and_run(out, fmt, inputs, names, direction)  # 3 rows: the batch size is free
    assert len(got) == len(want)
    for w, o in zip(want, got, strict=True):
        assert o.shape == w.shape
        assert float((o.float() - w).abs().max()) <= TOLERANCE


def test_cli_exports_safetensors_and_onnx(runs, tmp_path):
    for fmt in ("safetensors", "onnx"):
        out = tmp_path / f"g.{fmt}"
        r = run_cli("export", "--run", runs["dcgan_cond"], "--format", fmt, "--out", str(out), "--no-ema")
        assert r.returncode == 0, r.stderr
        assert "matched the generator" in r.stdout and out.is_file()


def test_bad_run_and_unknown_format_are_one_line(runs, tmp_path):
    out = str(tmp_path / "g.onnx")
    r = run_cli("export", "--run", str(tmp_path / "nope"), "--format", "onnx", "--out", out)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "no such run directory" in r.stderr
    r = run_cli("export", "--run", runs["dcgan_cond"], "--format", "tflite", "--out", out)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "tflite" in r.stderr
    r = run_cli("export", "--run", runs["pix2pix"], "--format", "onnx", "--direction", "BtoA", "--out", out)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "one way only" in r.stderr
    assert not os.listdir(tmp_path)


def test_existing_out_is_kept_unless_forced(runs, tmp_path):
    out = tmp_path / "g.safetensors"
    out.write_bytes(b"precious")
    r = run_cli("export", "--run", runs["dcgan_cond"], "--format", "safetensors", "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and r.stderr.strip().count("\n") == 0
    assert out.read_bytes() == b"precious"
    r = run_cli("export", "--run", runs["dcgan_cond"], "--format", "safetensors", "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() != b"precious"


def test_a_mismatching_export_is_removed_and_reported(runs, tmp_path, monkeypatch):
    from trainer import export

    def corrupt(ex, path):
        torch.jit.save(torch.jit.trace(export.NoiseToImage(torch.nn.Identity()), ex.inputs), path)

    monkeypatch.setitem(export.WRITERS, "torchscript", corrupt)
    out = str(tmp_path / "g.torchscript")
    with pytest.raises(export.ExportError, match="differs from the generator"):
        export_generator(runs["mlp"], "torchscript", out)
    assert not os.listdir(tmp_path)
