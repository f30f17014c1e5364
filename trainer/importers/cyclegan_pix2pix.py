"""The released CycleGAN and pix2pix weights (the reference PyTorch implementation's *_net_G.pth
state dicts) in ganforge's names.

The reference keeps each generator or discriminator as one `model` Sequential: the ResNet
generator and the PatchGAN discriminator have the same layer order as ganforge's (`model.N` is
`net.N`; a residual block's `conv_block.J` is `body.J`), while its U-Net nests one block per
level (`model.model.1.model.3.model...`), which ganforge keeps as flat `down` and `up` lists.
Sizes (widths, blocks, layers, norm, channels) are read off the tensors.

Two differences in the weights themselves:
- the U-Net decoder convolutions that take a concatenation get [skip, decoder] in the reference
  and [decoder, skip] in ganforge: their input channels (dim 0 of a ConvTranspose2d weight) swap halves;
- a convolution followed by batch norm has no bias in the reference and a bias in ganforge's
  ResNet generator: it is set to zero. Instance norms have no weights in either (the running
  statistics older reference versions saved are dropped, as the reference itself does since).
"""

from __future__ import annotations

import os
import re

import torch

from trainer.checkpoint import CheckpointError

RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A .pth state dict (torch.load weights_only=True), less any DataParallel `module.` prefix."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zips and bad pickles raise many kinds
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _drop_instance_running_stats(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Running statistics of a norm with no affine weight are an instance norm's (older reference code)."""
    out = {}
    for k, v in sd.items():
        stem, _, leaf = k.rpartition(".")
        if leaf in RUNNING and f"{stem}.weight" not in sd:
            continue
        out[k] = v
    return out


def _kind_of(sd: dict[str, torch.Tensor], norm_prefix: str) -> str:
    """batch (affine weights) or instance (none) for the norm at `norm_prefix`."""
    return "batch" if f"{norm_prefix}.weight" in sd else "instance"


def _need(sd: dict[str, torch.Tensor], key: str, path: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{path}: not a reference {what} state dict (no {key})")
    return sd[key]


def _fill_missing_bias(mapped: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> None:
    """ganforge has a bias where the reference's conv feeds a batch norm and has none: zero."""
    for k, v in template.items():
        if k.endswith(".bias") and k not in mapped and k[: -len("bias")] + "weight" in mapped:
            mapped[k] = torch.zeros_like(v)


# -- ResNet generator ----------------------------------------------------------------------------
def resnet_generator(path: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(state dict in the names of ganforge's ResnetGenerator, its sizes) from a reference ResnetGenerator file."""
    sd = _drop_instance_running_stats(read_state_dict(path))
    first = _need(sd, "model.1.weight", path, "ResnetGenerator")
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model\.(\d+)\.conv_block\.", k))})
    if not blocks or any(k.startswith("model.model.") for k in sd):
        raise CheckpointError(f"{path}: not a reference ResnetGenerator state dict (no residual blocks "
                              f"model.N.conv_block; a U-Net is imported with `ganforge import pix2pix`)")
    last_conv = f"model.{blocks[-1] + 2 * 3 + 2}.weight"  # two (convT, norm, relu) groups, then pad, conv
    last = _need(sd, last_conv, path, "ResnetGenerator (7x7 output conv after two transposed convs)")
    sizes = {"channels": int(first.shape[1]), "out_channels": int(last.shape[0]), "g_width": int(first.shape[0]),
             "n_blocks": len(blocks), "norm": _kind_of(sd, "model.2")}
    # pad, conv, norm, relu, pad, conv, norm; with dropout (none in ganforge's blocks) after the ReLU
    # the second conv moves from 5 to 6
    dropout = f"model.{blocks[0]}.conv_block.5.weight" not in sd
    out = {}
    for k, v in sd.items():
        m = re.match(r"model\.(\d+)\.conv_block\.(\d+)\.(.+)$", k)
        if m:
            j = int(m.group(2))
            if dropout and j >= 5:
                j -= 1
            out[f"net.{m.group(1)}.body.{j}.{m.group(3)}"] = v
        else:
            out["net." + k[len("model."):] if k.startswith("model.") else k] = v
    return out, sizes


# -- U-Net generator -----------------------------------------------------------------------------
def _unet_prefix(level: int) -> str:
    """The reference's key prefix of the U-Net block at `level` (0: outermost)."""
    return "model.model." + "1.model." * (level > 0) + "3.model." * max(level - 1, 0)


def unet_generator(path: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(state dict in the names of ganforge's UnetGenerator, its sizes) from a reference UnetGenerator file."""
    sd = read_state_dict(path)
    first = _need(sd, "model.model.0.weight", path, "UnetGenerator")
    levels = 1
    while any(k.startswith(_unet_prefix(levels)) for k in sd):
        levels += 1
    if levels < 5:
        raise CheckpointError(f"{path}: a reference U-Net has at least 5 levels; found {levels}")
    n = levels
    sd = _drop_instance_running_stats(sd)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(ref: str, mine: str, swap_halves: bool = False) -> None:
        for leaf in ("weight", "bias", *RUNNING):
            key = f"{ref}.{leaf}"
            if key in sd:
                v = sd[key]
                if swap_halves and leaf == "weight":  # [skip, decoder] -> [decoder, skip] input channels
                    h = v.shape[0] // 2
                    v = torch.cat([v[h:], v[:h]], 0)
                out[f"{mine}.{leaf}"] = v
                used.add(key)

    p0, inner = _unet_prefix(0), _unet_prefix(n - 1)
    take(p0 + "0", "down.0.0")
    take(p0 + "3", f"up.{n - 1}.1", swap_halves=True)
    for level in range(1, n - 1):
        p = _unet_prefix(level)
        take(p + "1", f"down.{level}.1")
        take(p + "2", f"down.{level}.2")
        take(p + "5", f"up.{n - 1 - level}.1", swap_halves=True)
        take(p + "6", f"up.{n - 1 - level}.2")
    take(inner + "1", f"down.{n - 1}.1")
    take(inner + "3", "up.0.1")
    take(inner + "4", "up.0.2")
    left = sorted(set(sd) - used)
    if left:
        raise CheckpointError(f"{path}: not a reference UnetGenerator state dict (unexpected {', '.join(left[:3])})")
    out_conv = out[f"up.{n - 1}.1.weight"]
    sizes = {"channels": int(first.shape[1]), "out_channels": int(out_conv.shape[1]), "g_width": int(first.shape[0]),
             "num_downs": n, "norm": _kind_of(sd, _unet_prefix(1) + "2")}
    return out, sizes


# -- PatchGAN discriminator ----------------------------------------------------------------------
def patch_discriminator(path: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """(state dict in the names of ganforge's PatchDiscriminator, its sizes) from a reference NLayerDiscriminator file."""
    sd = _drop_instance_running_stats(read_state_dict(path))
    first = _need(sd, "model.0.weight", path, "NLayerDiscriminator")
    convs = sorted(int(m.group(1)) for k, v in sd.items() if (m := re.match(r"model\.(\d+)\.weight$", k)) and v.dim() == 4)
    if any(not k.startswith("model.") or ".model." in k or "conv_block" in k for k in sd) or len(convs) < 3:
        raise CheckpointError(f"{path}: not a reference NLayerDiscriminator state dict")
    sizes = {"channels": int(first.shape[1]), "d_width": int(first.shape[0]), "d_layers": len(convs) - 2,
             "d_norm": _kind_of(sd, "model.3")}
    return {"net." + k[len("model."):]: v for k, v in sd.items()}, sizes


# -- the two families ----------------------------------------------------------------------------
def _agree(path_sizes: list[tuple[str, dict[str, object]]], key: str) -> object:
    """The one value of `key` that all the files share; CheckpointError naming the two that differ."""
    seen = [(p, s[key]) for p, s in path_sizes if key in s]
    for p, v in seen[1:]:
        if v != seen[0][1]:
            raise CheckpointError(f"{p}: {key} {v} differs from {seen[0][1]} in {seen[0][0]}; the files "
                                  f"are not one model")
    return seen[0][1]


def _same_channels(path: str, sizes: dict[str, object]) -> None:
    if sizes["channels"] != sizes["out_channels"]:
        raise CheckpointError(f"{path}: {sizes['channels']} input and {sizes['out_channels']} output channels; "
                              f"ganforge's translators keep one channel count (model.channels)")


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def from_cyclegan(g_ab: str, g_ba: str, d_a: str | None = None, d_b: str | None = None,
                  resolution: int = 256) -> tuple[dict[str, object], dict[str, dict[str, torch.Tensor]]]:
    """(config overrides, {"G", "D"?}) from the reference's files: g_ab its G_A (A -> B), g_ba its
    G_B, d_a the discriminator of domain-A images (the reference's D_B), d_b that of domain B (its D_A)."""
    (ga, sa), (gb, sb) = resnet_generator(g_ab), resnet_generator(g_ba)
    gens = [(g_ab, sa), (g_ba, sb)]
    for p, s in gens:
        _same_channels(p, s)
    overrides: dict[str, object] = {"model.arch": "cyclegan", "model.resolution": resolution,
                                    "model.channels": _agree(gens, "channels"), "model.g_width": _agree(gens, "g_width"),
                                    "model.n_blocks": _agree(gens, "n_blocks"), "model.norm": _agree(gens, "norm"),
                                    "loss.type": "lsgan"}
    g = _prefixed(ga, "g_ab.") | _prefixed(gb, "g_ba.")
    weights = {"G": _with_zero_biases(g, overrides)}
    if (d_a is None) != (d_b is None):
        raise CheckpointError("cyclegan: give both discriminators (--d-a and --d-b) or neither")
    if d_a is None:
        overrides["model.d_width"] = overrides["model.g_width"]  # D as built: the reference's ndf = ngf default
    else:
        (da, sda), (db, sdb) = patch_discriminator(d_a), patch_discriminator(d_b)
        discs = [(d_a, sda), (d_b, sdb)]
        _agree(gens[:1] + discs, "channels")
        overrides |= {"model.d_width": _agree(discs, "d_width"), "model.d_layers": _agree(discs, "d_layers"),
                      "model.d_norm": _agree(discs, "d_norm")}
        weights["D"] = _with_zero_biases(_prefixed(da, "d_a.") | _prefixed(db, "d_b."), overrides, "D")
    return overrides, weights


def from_pix2pix(g: str, d: str | None = None, resolution: int | None = None
                 ) -> tuple[dict[str, object], dict[str, dict[str, torch.Tensor]]]:
    """(config overrides, {"G", "D"?}) from the reference's U-Net G file and (optionally) its D file."""
    gw, sg = unet_generator(g)
    _same_channels(g, sg)
    side = 2 ** int(sg["num_downs"])
    if resolution is not None and resolution != side:
        from trainer.config import ConfigError

        raise ConfigError("--resolution", f"{g} is a U-Net of {sg['num_downs']} levels: it works on {side}x{side} "
                                          f"images, not {resolution}")
    overrides: dict[str, object] = {"model.arch": "pix2pix", "model.resolution": side, "model.channels": sg["channels"],
                                    "model.g_width": sg["g_width"], "model.norm": sg["norm"], "loss.type": "bce"}
    weights = {"G": _with_zero_biases(gw, overrides)}
    if d is None:
        overrides["model.d_width"] = sg["g_width"]  # D as built: the reference's ndf = ngf default
    else:
        dw, sd = patch_discriminator(d)
        if sd["channels"] != 2 * int(sg["channels"]):
            raise CheckpointError(f"{d}: a pix2pix D sees (input, output) stacked: {2 * int(sg['channels'])} channels; "
                                  f"this one takes {sd['channels']}")
        overrides |= {"model.d_width": sd["d_width"], "model.d_layers": sd["d_layers"], "model.d_norm": sd["d_norm"]}
        weights["D"] = _with_zero_biases(dw, overrides, "D")
    return overrides, weights


def _with_zero_biases(sd: dict[str, torch.Tensor], overrides: dict[str, object], which: str = "G") -> dict[str, torch.Tensor]:
    """`sd` plus the zero biases ganforge's network of `overrides` has where the reference's has none."""
    from trainer.importers import imported_config
    from trainer.models import build_models

    cfg = imported_config("import", overrides)
    g, d = build_models(cfg.model)
    out = dict(sd)
    _fill_missing_bias(out, (g if which == "G" else d).state_dict())
    return out
