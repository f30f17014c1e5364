"""The DCGAN of pytorch/examples (`dcgan/main.py`): its netG / netD state dicts as ganforge's dcgan networks.

The reference builds G as one `main` Sequential of transposed convolutions (bias-free), batch
norms and ReLUs ending in Tanh, for 64x64 images, and D as convolutions, batch norms and leaky
ReLUs ending in a bias-free 4x4 convolution and a Sigmoid. ganforge's dcgan networks have the same
layers in the same order (`net.N` for `main.N` in G; `features.N` and `head` in D), plus biases
where the reference has none: those are set to 0. D's Sigmoid is not a layer in ganforge (its D
returns logits; the losses apply the sigmoid), so imported D outputs are the reference's before
its Sigmoid.
"""

from __future__ import annotations

import torch

from trainer.checkpoint import CheckpointError
from trainer.importers.cyclegan_pix2pix import read_state_dict

RESOLUTION = 64  # the reference's networks are for 64x64 images


def convs(sd: dict[str, torch.Tensor]) -> list[int]:
    """Indices N of main.N that hold a 4-D (convolution) weight, in order."""
    return sorted(int(k.split(".")[1]) for k, v in sd.items() if k.startswith("main.") and k.endswith(".weight")
                  and v.dim() == 4)


def from_pytorch_examples(g_path: str, d_path: str | None = None) -> tuple[dict[str, object], dict[str, dict[str, torch.Tensor]]]:
    """(config overrides, {"G", "G_ema", "D"?}) from the reference's netG (and netD) .pth files."""
    g = read_state_dict(g_path)
    layers = convs(g)
    if not layers or any(not k.startswith("main.") for k in g) or len(layers) != 5:
        raise CheckpointError(f"{g_path}: not a pytorch/examples DCGAN generator (five ConvTranspose2d layers in `main`)")
    first, last = g[f"main.{layers[0]}.weight"], g[f"main.{layers[-1]}.weight"]
    z_dim, width, channels = first.shape[0], last.shape[0], last.shape[1]
    overrides: dict[str, object] = {"model.arch": "dcgan", "model.resolution": RESOLUTION, "model.channels": channels,
                                    "model.z_dim": z_dim, "model.g_width": width, "model.norm": "batch"}
    mapped_g = {f"net.{k[len('main.'):]}": v for k, v in g.items()}
    mapped_g[f"net.{layers[-1]}.bias"] = torch.zeros(channels)
    weights = {"G": mapped_g, "G_ema": dict(mapped_g)}
    if d_path:
        d = read_state_dict(d_path)
        d_layers = convs(d)
        if len(d_layers) != 5 or d[f"main.{d_layers[0]}.weight"].shape[1] != channels:
            raise CheckpointError(f"{d_path}: not a pytorch/examples DCGAN discriminator for {channels}-channel images")
        head = d_layers[-1]
        mapped_d = {(f"head.{k.split('.', 2)[2]}" if int(k.split(".")[1]) == head else f"features.{k[len('main.'):]}"): v
                    for k, v in d.items()}
        mapped_d[f"features.{d_layers[0]}.bias"] = torch.zeros(d[f"main.{d_layers[0]}.weight"].shape[0])
        mapped_d["head.bias"] = torch.zeros(1)
        overrides["model.d_width"] = d[f"main.{d_layers[0]}.weight"].shape[0]
        weights["D"] = mapped_d
    else:
        overrides["model.d_width"] = width
    return overrides, weights
