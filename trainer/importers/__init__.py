"""Importing released weights of other implementations as a ganforge run directory.

An importer reads the other implementation's files without running code from them
(network_pickle.py: StyleGAN2-ADA pickles; cyclegan_pix2pix.py: CycleGAN / pix2pix .pth state
dicts), maps the names and sizes to ganforge's networks, and `write_imported_run` writes a run
directory that `ganforge sample`, `translate`, `eval` and `checkpoint.init_from=RUN` accept.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from trainer import __version__
from trainer.checkpoint import CheckpointError, write_checkpoint
from trainer.config import Config, ConfigError, apply, check_declared, dump_yaml, to_dict
from trainer.redact import redact

NETWORKS = ("G", "D", "G_ema")


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"model.arch": "x"} -> {"model": {"arch": "x"}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, name = key.split(".")
        node = out
        for s in sections:
            node = node.setdefault(s, {})
        node[name] = value
    return out


def imported_config(out_dir: str, overrides: dict[str, Any]) -> Config:
    """ganforge's default Config with `overrides` (flat dotted keys) applied, run.dir = `out_dir`;
    ConfigError naming an unknown key or a value out of bounds."""
    cfg = apply(Config(), nested(overrides))
    cfg.run.name, cfg.run.dir = os.path.basename(os.path.normpath(out_dir)), out_dir
    check_declared(cfg)
    from trainer.families import family

    family(cfg.model.arch)  # a ConfigError naming model.arch when no family has it
    return cfg


def check_out_dir(out_dir: str) -> None:
    """An imported run goes into a new or empty directory: nothing already there is overwritten."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ConfigError("--out", f"{out_dir} exists and is not an empty directory; an import writes a new run "
                                   f"directory and overwrites nothing (choose another --out)")


def built_weights(cfg: Config, weights: dict[str, dict[str, torch.Tensor]], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts of ganforge's networks for `cfg` loaded with `weights` (names and shapes
    checked by trainer.core.load_weights); a network not given starts as the family builds it."""
    from trainer.core import load_weights
    from trainer.models import build_models

    torch.manual_seed(cfg.seed)
    g, d = build_models(cfg.model)
    out = {}
    for name, module in (("G", g), ("D", d), ("G_ema", copy.deepcopy(g))):
        if name in weights:
            load_weights(module, weights[name], f"{source}: {name}")
            out[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    if "G" not in out and "G_ema" not in out:
        raise CheckpointError(f"{source}: no generator weights to import")
    if "D" not in out:  # a released generator alone: fine-tuning starts D as the family builds it
        out["D"] = {k: v.detach().clone() for k, v in d.state_dict().items()}
    return out


def write_imported_run(out_dir: str, overrides: dict[str, Any], weights: dict[str, dict[str, torch.Tensor]],
                       source: str) -> str:
    """Write `out_dir` as a ganforge run holding the imported weights; returns the checkpoint's path.

    `overrides`: flat config keys ({"model.arch": "cyclegan", "model.n_blocks": 9, ...}) over the
    default Config; `weights`: ganforge state dicts "G", "D" (optional: as built, seeded by
    `seed`) and "G_ema" (optional). The run holds config.yaml and checkpoints/step_00000000 (a
    committed, verified checkpoint at step 0 with the config, the networks and `source`), so
    `sample`, `translate`, `eval` and `checkpoint.init_from` read it like a trained run.
    Refuses an existing non-empty `out_dir`.
    """
    check_out_dir(out_dir)
    unknown = sorted(set(weights) - set(NETWORKS))
    if unknown:
        raise ValueError(f"weights: unknown networks {unknown} (expected {', '.join(NETWORKS)})")
    cfg = imported_config(out_dir, overrides)
    nets = built_weights(cfg, weights, source)
    state = {"version": __version__, "step": 0, "nimg": 0, "config": to_dict(redact(cfg)),
             "imported_from": source, "imported_networks": sorted(weights), **nets}
    os.makedirs(out_dir, exist_ok=True)
    path = write_checkpoint(out_dir, 0, state)
    config_path = os.path.join(out_dir, "config.yaml")
    with open(config_path + ".tmp", "w") as f:
        f.write(dump_yaml(redact(cfg)))
    os.replace(config_path + ".tmp", config_path)
    return path
