"""ganforge's StyleGAN2 computes what NVlabs' stylegan2-ada-pytorch computes, given its weights.

The fixture (tests/data/stylegan2_reference/networks.pt, written by record.py there) holds small
official networks with every parameter randomised, and the reference's outputs on fixed
inputs. Each network goes through the importer's name map into ganforge's modules.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from trainer.checkpoint import CheckpointError
from trainer.config import ModelConfig
from trainer.importers.stylegan2_ada import from_official
from trainer.models.stylegan2 import SamplingGenerator, build

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "stylegan2_reference", "networks.pt")
TOLERANCE = 1e-4
CASES = torch.load(FIXTURE, weights_only=True)


def ganforge_networks(case: dict) -> dict[str, torch.nn.Module]:
    overrides, states = from_official(case["nets"], case["init_kwargs"])
    cfg = ModelConfig(**{key.removeprefix("model."): value for key, value in overrides.items()})
    nets = {}
    for name, state in states.items():
        g, d = build(cfg)
        net = d if name == "D" else g
        net.load_state_dict(state, strict=True)
        nets[name] = net.eval()
    return nets


@pytest.mark.parametrize("case", sorted(CASES))
def test_generator_and_discriminator_give_the_reference_outputs(case):
    ref = CASES[case]
    nets = ganforge_networks(ref)
    with torch.no_grad():
        for name in ("G", "G_ema"):
            for psi in (1.0, 0.7):
                got = SamplingGenerator(nets[name], psi, noise_mode="const")(ref["inputs"]["z"])
                want = ref["outputs"][f"{name} psi={psi}"]
                assert got.shape == want.shape
                assert float((got - want).abs().max()) <= TOLERANCE, f"{name} psi={psi}"
        got = nets["D"](ref["inputs"]["images"])
        assert float((got - ref["outputs"]["D"].reshape(-1)).abs().max()) <= TOLERANCE, "D"


def test_the_name_map_gives_the_settings_and_refuses_what_ganforge_cannot_represent():
    ref = CASES["gray16"]
    overrides, states = from_official({"G_ema": ref["nets"]["G_ema"]}, ref["init_kwargs"])
    assert overrides == {"model.arch": "stylegan2", "model.resolution": 16, "model.channels": 1, "model.z_dim": 12,
                         "model.w_dim": 8, "model.map_layers": 3, "model.channel_base": 64, "model.g_width": 8}
    assert set(states) == {"G_ema"}
    assert states["G_ema"]["mapping.w_avg"].equal(ref["nets"]["G_ema"]["mapping.w_avg"])

    def refused(net: str, **changes) -> str:
        kwargs = copy.deepcopy(ref["init_kwargs"])
        for key, value in changes.items():
            *path, leaf = key.split(".")
            target = kwargs[net]
            for part in path:
                target = target.setdefault(part, {})
            target[leaf] = value
        with pytest.raises(CheckpointError) as e:
            from_official(ref["nets"], kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "c_dim" in refused("G_ema", c_dim=10)
    assert "architecture" in refused("G_ema", **{"synthesis_kwargs.architecture": "resnet"})
    assert "architecture" in refused("D", architecture="skip")
    assert "mbstd_num_channels" in refused("D", **{"epilogue_kwargs.mbstd_num_channels": 2})
    assert "lr_multiplier" in refused("G", **{"mapping_kwargs.lr_multiplier": 1.0})
    broken = dict(ref["nets"], D={k: v for k, v in ref["nets"]["D"].items() if k != "b4.fc.weight"})
    with pytest.raises(CheckpointError, match="b4.fc.weight"):
        from_official(broken, ref["init_kwargs"])
