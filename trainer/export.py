"""`ganforge export`: a run's generator as safetensors, TorchScript, ONNX or a torch.export program.

Every artefact is checked before it takes its name: it is loaded back the way a user would load it,
run on fixed inputs, and compared with the generator it came from.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from trainer.config import ConfigError, to_dict
from trainer.families import family
from trainer.models import build_models
from trainer.sampling import class_cycle, latents

FORMATS = ("safetensors", "torchscript", "onnx", "exported")
# max |exported - original| on the check inputs, per unit of output scale: 1e-5 for outputs in [-1, 1].
# StyleGAN2's outputs are not clamped and its unfused export sums in another order: at 256x256 (random
# init, outputs up to 7.9) the two differ by 4.3e-5, at 32x32 by 3.8e-6 (docs/export.md).
TOLERANCE = 1e-5
CHECK_ROWS = 4
CHECK_SEED = 0


class ExportError(Exception):
    """An export that could not be written or did not reproduce its generator."""


class NoiseToImage(nn.Module):
    """z -> image (or point): the signature every unconditional generator is exported with."""

    def __init__(self, g: nn.Module):
        super().__init__()
        self.g = g

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.g(z)


class LabelledNoiseToImage(NoiseToImage):
    """(z, class labels) -> image, for conditional generators."""

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.g(z, labels)


class ImageToImage(NoiseToImage):
    """image -> translated image: one translation direction, pix2pix's generator, or an upscaler."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.g(x)


class BothDirections(NoiseToImage):
    """(a, b) -> (G_AB(a), G_BA(b)): CycleGAN's two generators in one artefact."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.g.g_ab(a), self.g.g_ba(b)


@dataclass
class Exportable:
    """A generator ready to export: its network, the wrapper that fixes its signature, and check inputs."""

    net: nn.Module  # whose state_dict the safetensors file holds
    part: str  # where `net` sits in the run's generator: "" (all of it), "g_ab" or "g_ba"
    model: nn.Module  # the exported module (net behind a fixed signature)
    inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    config: dict


def exportable(run_dir: str, checkpoint: str | None = None, use_ema: bool = True,
               direction: str | None = None) -> Exportable:
    """The run's generator (its EMA unless `use_ema` is False; translation runs have no EMA) behind
    the signature it is exported with, and fixed inputs to check an export against."""
    from trainer.families.image_to_image import load_translator
    from trainer.generate import load_checkpoint_state, load_generator

    _, _, cfg = load_checkpoint_state(run_dir, checkpoint)
    m = cfg.model
    command = family(m.arch).command
    if command == "translate":
        net, cfg = load_translator(run_dir, direction, checkpoint)
        g = torch.Generator().manual_seed(CHECK_SEED)
        images = [torch.rand(CHECK_ROWS, m.channels, m.resolution, m.resolution, generator=g) * 2 - 1
                  for _ in range(2)]
        if m.arch == "cyclegan" and direction is None:
            return Exportable(net, "", BothDirections(net).eval(), tuple(images), ("a", "b"), to_dict(cfg))
        part = {"AtoB": "g_ab", "BtoA": "g_ba"}[direction] if m.arch == "cyclegan" else ""
        return Exportable(net, part, ImageToImage(net).eval(), (images[0],), ("image",), to_dict(cfg))
    if direction is not None:
        raise ConfigError("--direction", f"a {m.arch} run has one generator; --direction is for cyclegan and "
                                         "pix2pix runs")
    if command == "upscale":
        from trainer.families.esrgan import load_upscaler

        net, cfg, _ = load_upscaler(run_dir, checkpoint, use_ema)
        side = family(m.arch).input_side(m)
        lr = torch.rand(CHECK_ROWS, m.channels, side, side, generator=torch.Generator().manual_seed(CHECK_SEED)) * 2 - 1
        return Exportable(net, "", ImageToImage(net).eval(), (lr,), ("image",), to_dict(cfg))
    net, cfg, _ = load_generator(run_dir, checkpoint, use_ema)
    z = latents(CHECK_SEED, CHECK_ROWS, m.z_dim)
    if m.num_classes:
        labels = class_cycle(CHECK_ROWS, m.num_classes)
        return Exportable(net, "", LabelledNoiseToImage(net).eval(), (z, labels), ("z", "labels"), to_dict(cfg))
    return Exportable(net, "", NoiseToImage(net).eval(), (z,), ("z",), to_dict(cfg))


def export_generator(run_dir: str, fmt: str, out: str, checkpoint: str | None = None, use_ema: bool = True,
                     direction: str | None = None, force: bool = False) -> float:
    """Write the run's generator to `out` in `fmt`, load it back and run it on the check inputs;
    returns the max |difference| from the original. A mismatch removes the file and raises ExportError."""
    if fmt not in FORMATS:
        raise ConfigError("--format", f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if os.path.exists(out) and not force:
        raise ConfigError("--out", f"{out} already exists; pass --force to replace it")
    ex = exportable(run_dir, checkpoint, use_ema, direction)
    with torch.no_grad():
        expected = as_tuple(ex.model(*ex.inputs))
    for m in ex.model.modules():  # StyleGAN2's batch-sized grouped convs would fix the exported batch size
        if hasattr(m, "fused_modconv"):
            m.fused_modconv = False
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    base, ext = os.path.splitext(out)
    partial = f"{base}.partial{'.pt2' if fmt == 'exported' else ext}"  # torch.export.load wants .pt2
    try:
        WRITERS[fmt](ex, partial)
        got = as_tuple(RUNNERS[fmt](ex, partial))
        diff = max(float((g.float() - e.float()).abs().max()) for g, e in zip(got, expected, strict=True))
        tolerance = TOLERANCE * max(1.0, *(float(e.abs().max()) for e in expected))
        if not diff <= tolerance:
            raise ExportError(f"{out}: the {fmt} export differs from the generator by {diff:.3g} "
                              f"(more than {tolerance:.3g}) on the check inputs; nothing was written")
        os.replace(partial, out)
        return diff
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(torch.as_tensor(o) for o in out) if isinstance(out, (tuple, list)) else (torch.as_tensor(out),)


def batch_dims(ex: Exportable) -> tuple[dict[int, object], ...]:
    """Dim 0 (the batch) of every input is free in the exported graph."""
    return tuple({0: torch.export.Dim.DYNAMIC} for _ in ex.inputs)


# -- writers: one per format ------------------------------------------------------------------------
def write_safetensors(ex: Exportable, path: str) -> None:
    from safetensors.torch import save_file

    meta = {"ganforge.config": json.dumps(ex.config), "ganforge.part": ex.part}
    save_file({k: v.detach().contiguous() for k, v in ex.net.state_dict().items()}, path, metadata=meta)


def write_torchscript(ex: Exportable, path: str) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream; asked for by name
        torch.jit.save(torch.jit.trace(ex.model, ex.inputs, check_trace=False), path)


def write_onnx(ex: Exportable, path: str) -> None:
    outputs = {BothDirections: ["fake_b", "fake_a"], ImageToImage: ["translated"]}.get(type(ex.model), ["image"])
    torch.onnx.export(ex.model, ex.inputs, path, input_names=list(ex.input_names), output_names=outputs,
                      dynamic_shapes=batch_dims(ex), dynamo=True, external_data=False, verbose=False)


def write_exported(ex: Exportable, path: str) -> None:
    torch.export.save(torch.export.export(ex.model, ex.inputs, dynamic_shapes=batch_dims(ex)), path)


# -- runners: load an artefact back as a user would, and run it on the check inputs ----------------
def run_safetensors(ex: Exportable, path: str):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from trainer.config import from_dict

    with safe_open(path, "pt") as f:
        meta = f.metadata()
    g, _ = build_models(from_dict(json.loads(meta["ganforge.config"])).model)
    net = g.get_submodule(meta["ganforge.part"])
    net.load_state_dict(load_file(path))
    model = type(ex.model)(net).eval()
    with torch.no_grad():
        return model(*ex.inputs)


def run_torchscript(ex: Exportable, path: str):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path)(*ex.inputs)


def run_onnx(ex: Exportable, path: str):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feed = {name: x.numpy() for name, x in zip(ex.input_names, ex.inputs, strict=True)}
    return session.run(None, feed)


def run_exported(ex: Exportable, path: str):
    with torch.no_grad():
        return torch.export.load(path).module()(*ex.inputs)


WRITERS = {"safetensors": write_safetensors, "torchscript": write_torchscript, "onnx": write_onnx,
           "exported": write_exported}
RUNNERS = {"safetensors": run_safetensors, "torchscript": run_torchscript, "onnx": run_onnx,
           "exported": run_exported}
