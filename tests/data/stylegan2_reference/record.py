"""Records the StyleGAN2-ADA reference fixture: small official networks and their outputs.

Run by hand, with a checkout of NVlabs/stylegan2-ada-pytorch (its code is imported from there,
never copied; what is saved is data only, loadable with torch.load(weights_only=True)):

    STYLEGAN2_ADA=/path/to/stylegan2-ada-pytorch .venv/bin/python -m tests.data.stylegan2_reference.record

Writes networks.pt next to this file: for each case, the official state dicts of G, G_ema and
D, their constructor kwargs, fixed inputs, and the reference outputs (G at truncation 1 and 0.7
with the stored noise maps; D's logits). Every parameter and buffer is randomised (biases,
noise strengths and w_avg included, which start at 0) so that each one shows in the outputs.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "networks.pt")
BATCH = 4

# name -> (G kwargs, D kwargs)
CASES = {
    "rgb32": (dict(z_dim=8, c_dim=0, w_dim=16, img_resolution=32, img_channels=3,
                   mapping_kwargs=dict(num_layers=2),
                   synthesis_kwargs=dict(channel_base=256, channel_max=32, num_fp16_res=0, conv_clamp=256)),
              dict(c_dim=0, img_resolution=32, img_channels=3, architecture="resnet", channel_base=256,
                   channel_max=32, num_fp16_res=0, conv_clamp=256, block_kwargs={}, mapping_kwargs={},
                   epilogue_kwargs=dict(mbstd_group_size=2))),
    "gray16": (dict(z_dim=12, c_dim=0, w_dim=8, img_resolution=16, img_channels=1,
                    mapping_kwargs=dict(num_layers=3), synthesis_kwargs=dict(channel_base=64, channel_max=8)),
               dict(c_dim=0, img_resolution=16, img_channels=1, channel_base=64, channel_max=16,
                    epilogue_kwargs=dict(mbstd_group_size=4))),
}


def plain(value):
    """EasyDicts and tuples as plain dicts and lists (what weights_only loading accepts)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def randomise(net: torch.nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if name.endswith("resample_filter"):
                continue
            if name.endswith(("bias", "noise_strength", "w_avg")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.5)
            else:
                t.mul_(1 + 0.1 * torch.randn(t.shape, generator=gen))


def record_case(networks, g_kwargs: dict, d_kwargs: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    g = networks.Generator(**g_kwargs).eval()
    d = networks.Discriminator(**d_kwargs).eval()
    randomise(g, gen)
    randomise(d, gen)
    g_ema = copy.deepcopy(g)
    randomise(g_ema, gen)
    z = torch.randn(BATCH, g_kwargs["z_dim"], generator=gen)
    c = torch.zeros(BATCH, 0)
    res, ch = g_kwargs["img_resolution"], g_kwargs["img_channels"]
    images = torch.rand(BATCH, ch, res, res, generator=gen) * 2 - 1
    outputs = {}
    with torch.no_grad():
        for name, net in (("G", g), ("G_ema", g_ema)):
            for psi in (1.0, 0.7):
                outputs[f"{name} psi={psi}"] = net(z, c, truncation_psi=psi, noise_mode="const", force_fp32=True)
        outputs["D"] = d(images, c, force_fp32=True)
    state = lambda net: {k: v.detach().clone() for k, v in net.state_dict().items()}  # noqa: E731
    return {"nets": {"G": state(g), "G_ema": state(g_ema), "D": state(d)},
            "init_kwargs": {"G": plain(g.init_kwargs), "G_ema": plain(g_ema.init_kwargs), "D": plain(d.init_kwargs)},
            "inputs": {"z": z, "images": images}, "outputs": outputs}


def main() -> None:
    root = os.environ.get("STYLEGAN2_ADA")
    if not root or not os.path.isfile(os.path.join(root, "training", "networks.py")):
        sys.exit("set STYLEGAN2_ADA to a checkout of NVlabs/stylegan2-ada-pytorch")
    sys.path.insert(0, root)
    from training import networks  # the reference, from the checkout only

    cases = {name: record_case(networks, g_kw, d_kw, seed) for seed, (name, (g_kw, d_kw)) in enumerate(CASES.items())}
    torch.save(cases, OUT)
    torch.load(OUT, weights_only=True)  # what the test does
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
