"""StyleGAN2-ADA's networks as ganforge's: the model settings and the parameter names.

NVlabs' stylegan2-ada-pytorch keeps a network as (constructor kwargs, state dict); `from_official`
turns those into `model.*` overrides and state dicts that `trainer.models.stylegan2` loads as
they are (the same tensors, renamed; the noise maps reshaped). ganforge computes the same
functions (tests/test_stylegan2_reference.py holds it to the reference's outputs), so nothing
is re-laid out.

What ganforge cannot represent stops the import with a CheckpointError naming it: labels
(c_dim > 0), another G than the skip architecture or D than the ResNet one, several
minibatch-std channels or a group of the whole batch, other mapping widths or learning-rate
multiplier, another activation or resampling filter, G without noise inputs.

Accepted and left aside: `num_fp16_res` (fp16 is a run-time choice; the stored weights are
fp32 either way) and `conv_clamp`. The reference clamps the output of every conv layer and
toRGB (after bias and activation) to +-conv_clamp, 256 in its training configs, to keep fp16
activations finite. ganforge does not clamp: an imported network's outputs differ from the
reference's only where one of those activations goes beyond +-conv_clamp.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.checkpoint import CheckpointError

MAPPING_LR_MUL = 0.01  # ganforge's MappingNetwork
FIR = [1, 3, 3, 1]


def _fail(what: str) -> CheckpointError:
    return CheckpointError(f"stylegan2-ada network: {what} cannot be represented in ganforge")


def _generator_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    mapping, synthesis = dict(kw.get("mapping_kwargs") or {}), dict(kw.get("synthesis_kwargs") or {})
    w_dim = int(kw["w_dim"])
    if int(kw.get("c_dim") or 0) > 0:
        raise _fail(f"G c_dim={kw['c_dim']} (class labels)")
    checks = [
        ("G synthesis_kwargs.architecture", synthesis.get("architecture", "skip"), "skip"),
        ("G mapping_kwargs.lr_multiplier", float(mapping.get("lr_multiplier", MAPPING_LR_MUL)), MAPPING_LR_MUL),
        ("G mapping_kwargs.layer_features", mapping.get("layer_features") or w_dim, w_dim),
        ("G mapping_kwargs.activation", mapping.get("activation", "lrelu"), "lrelu"),
        ("G synthesis_kwargs.activation", synthesis.get("activation", "lrelu"), "lrelu"),
        ("G synthesis_kwargs.resample_filter", list(synthesis.get("resample_filter", FIR)), FIR),
        ("G synthesis_kwargs.use_noise", synthesis.get("use_noise", True), True),
        ("G synthesis_kwargs.kernel_size", synthesis.get("kernel_size", 3), 3),
    ]
    for name, value, supported in checks:
        if value != supported:
            raise _fail(f"{name}={value!r} (ganforge: {supported!r})")
    return {"model.arch": "stylegan2", "model.resolution": int(kw["img_resolution"]),
            "model.channels": int(kw["img_channels"]), "model.z_dim": int(kw["z_dim"]), "model.w_dim": w_dim,
            "model.map_layers": int(mapping.get("num_layers", 8)),
            "model.channel_base": int(synthesis.get("channel_base", 32768)),
            "model.g_width": int(synthesis.get("channel_max", 512))}


def _discriminator_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    block, epilogue = dict(kw.get("block_kwargs") or {}), dict(kw.get("epilogue_kwargs") or {})
    if int(kw.get("c_dim") or 0) > 0:
        raise _fail(f"D c_dim={kw['c_dim']} (class labels)")
    group = epilogue.get("mbstd_group_size", kw.get("mbstd_group_size", 4))
    num_channels = int(epilogue.get("mbstd_num_channels", kw.get("mbstd_num_channels", 1)))
    if num_channels > 1:
        raise _fail(f"D mbstd_num_channels={num_channels} (ganforge: 0 or 1)")
    if num_channels and group is None:
        raise _fail("D mbstd_group_size=None (a group of the whole batch)")
    checks = [
        ("D architecture", kw.get("architecture", "resnet"), "resnet"),
        ("D block_kwargs.activation", block.get("activation", "lrelu"), "lrelu"),
        ("D block_kwargs.resample_filter", list(block.get("resample_filter", FIR)), FIR),
    ]
    for name, value, supported in checks:
        if value != supported:
            raise _fail(f"{name}={value!r} (ganforge: {supported!r})")
    return {"model.resolution": int(kw["img_resolution"]), "model.channels": int(kw["img_channels"]),
            "model.channel_base": int(kw.get("channel_base", 32768)), "model.d_width": int(kw.get("channel_max", 512)),
            "model.mbstd_group": int(group) if num_channels else 0}


def _generator_names(res_log2: int, map_layers: int) -> dict[str, str]:
    """ganforge name -> official name, for every G parameter and kept buffer."""
    names = {"mapping.w_avg": "mapping.w_avg"}
    for i in range(map_layers):
        for p in ("weight", "bias"):
            names[f"mapping.net.{i}.{p}"] = f"mapping.fc{i}.{p}"
    for k, log2 in enumerate(range(2, res_log2 + 1)):
        ours, theirs = f"blocks.{k}", f"synthesis.b{2 ** log2}"
        if k == 0:
            names[f"{ours}.const"] = f"{theirs}.const"
        for conv in ("conv1",) if k == 0 else ("conv0", "conv1"):
            for p in ("affine.weight", "affine.bias", "weight", "bias", "noise_strength", "noise_const"):
                names[f"{ours}.{conv}.{p}"] = f"{theirs}.{conv}.{p}"
        for p in ("affine.weight", "affine.bias", "weight", "bias"):
            names[f"{ours}.torgb.{p}"] = f"{theirs}.torgb.{p}"
    return names


def _discriminator_names(res_log2: int) -> dict[str, str]:
    top = f"b{2 ** res_log2}"
    names = {"from_rgb.weight": f"{top}.fromrgb.weight", "from_rgb.bias": f"{top}.fromrgb.bias"}
    for k, log2 in enumerate(range(res_log2, 2, -1)):
        ours, theirs = f"blocks.{k}", f"b{2 ** log2}"
        for p in ("conv0.weight", "conv0.bias", "conv1.weight", "conv1.bias", "skip.weight"):
            names[f"{ours}.{p}"] = f"{theirs}.{p}"
    for layer in ("conv", "fc", "out"):
        for p in ("weight", "bias"):
            names[f"{layer}.{p}"] = f"b4.{layer}.{p}"
    return names


def _rename(net: str, state: dict[str, torch.Tensor], names: dict[str, str],
            shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """`state` under ganforge's names, each tensor checked against the shape ganforge builds."""
    unused = {k for k in state if not k.endswith("resample_filter")} - set(names.values())
    if unused:
        raise _fail(f"{net} entry {sorted(unused)[0]!r} (no ganforge counterpart)")
    if set(names) != set(shapes):  # the two name lists disagree: a bug here, not in the file
        raise CheckpointError(f"stylegan2-ada network: {net} names {sorted(set(names) ^ set(shapes))[:3]} "
                              "are not mapped")
    out = {}
    for ours, theirs in names.items():
        if theirs not in state:
            raise CheckpointError(f"stylegan2-ada network: {net} has no {theirs!r}")
        t = state[theirs].detach().to(torch.float32)
        if ours.endswith("noise_const"):
            t = t.reshape(1, 1, *t.shape[-2:])
        if t.shape != shapes[ours]:
            raise CheckpointError(f"stylegan2-ada network: {net} {theirs!r} has shape {tuple(t.shape)}, "
                                  f"ganforge's {ours!r} {tuple(shapes[ours])}")
        out[ours] = t.clone().contiguous()
    return out


def from_official(nets: dict[str, dict[str, torch.Tensor]], init_kwargs: dict[str, dict[str, Any]]
                  ) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(model.* overrides, {"G", "D", "G_ema": ganforge state dicts}) from official state dicts
    and constructor kwargs (keyed the same way; "G" or "G_ema" must be there)."""
    from trainer.models.stylegan2 import StyleGAN2Discriminator, StyleGAN2Generator

    g_key = "G_ema" if "G_ema" in nets else "G"
    if g_key not in nets:
        raise CheckpointError("stylegan2-ada network: neither G_ema nor G is present")
    unknown = set(nets) - {"G", "D", "G_ema"}
    if unknown:
        raise CheckpointError(f"stylegan2-ada network: unknown network {sorted(unknown)[0]!r}")
    for key in nets:
        if key not in init_kwargs:
            raise CheckpointError(f"stylegan2-ada network: no constructor kwargs for {key}")
    overrides = _generator_overrides(init_kwargs[g_key])
    for key in ("G", "G_ema"):
        if key in nets and key != g_key and _generator_overrides(init_kwargs[key]) != overrides:
            raise CheckpointError(f"stylegan2-ada network: {key} and {g_key} are built differently")
    if "D" in nets:
        d_overrides = _discriminator_overrides(init_kwargs["D"])
        for key in ("model.resolution", "model.channels", "model.channel_base"):
            if d_overrides[key] != overrides[key]:
                raise _fail(f"D {key}={d_overrides[key]} with G's {overrides[key]} (ganforge shares it)")
        overrides.update(d_overrides)

    res, res_log2 = overrides["model.resolution"], overrides["model.resolution"].bit_length() - 1
    if res < 8 or res != 2 ** res_log2:
        raise _fail(f"img_resolution={res} (ganforge: a power of two >= 8)")
    with torch.device("meta"):  # shapes only: nothing allocated
        g = StyleGAN2Generator(overrides["model.z_dim"], overrides["model.w_dim"], overrides["model.map_layers"], res,
                               overrides["model.channels"], overrides["model.channel_base"], overrides["model.g_width"])
        d = StyleGAN2Discriminator(res, overrides["model.channels"], overrides["model.channel_base"],
                                   overrides.get("model.d_width", 1), overrides.get("model.mbstd_group", 0))
    g_shapes, d_shapes = ({k: v.shape for k, v in net.state_dict().items()} for net in (g, d))
    g_names = _generator_names(res_log2, overrides["model.map_layers"])
    states = {key: _rename(key, nets[key], g_names, g_shapes) for key in ("G", "G_ema") if key in nets}
    if "D" in nets:
        states["D"] = _rename("D", nets["D"], _discriminator_names(res_log2), d_shapes)
    return overrides, states


def from_pickle(path: str) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """from_official of an official network pickle, read as data (trainer.importers.network_pickle);
    a file of the right kind but the wrong content is a CheckpointError naming it, in one line."""
    from trainer.importers.network_pickle import read_network_pickle

    try:
        return from_official(*read_network_pickle(path))
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as e:
        why = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path}: not a StyleGAN2-ADA network pickle ganforge can read "
                              f"({type(e).__name__}: {why})") from None
