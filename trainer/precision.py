"""Precision modes: which one a run uses, and widening that never narrows a float64 run.

`fp32` trains in float32; `bf16` and `fp16` autocast over float32 weights; `fp64` makes float64
the default dtype before any network is built, so every weight, latent, real batch and penalty
interpolation is float64 (slow; for equivalence checks, where float32 summation-order noise
would hide a real difference). Losses and statistics are reduced in at least float32: `upcast`
widens autocast's half-precision results and leaves float32 and float64 alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from trainer.config import ConfigError

LAUNCHER_VARIABLE = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch --mixed_precision`


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: an explicit config value, else (`auto`) the launcher's
    `--mixed_precision bf16|fp16`, else bf16 on GPU and fp32 on CPU."""
    if precision != "auto":
        return precision
    launcher = os.environ.get(LAUNCHER_VARIABLE, "").lower()
    if launcher in ("bf16", "fp16"):
        return launcher
    return "bf16" if device.type == "cuda" else "fp32"


def check_launcher_precision(precision: str, environ: Mapping[str, str] = os.environ) -> None:
    """precision=auto follows accelerate's --mixed_precision: refuse (naming `precision`) one that
    ganforge does not train in, at startup before anything is built."""
    launcher = environ.get(LAUNCHER_VARIABLE, "")
    if precision == "auto" and launcher.lower() not in ("", "no", "bf16", "fp16"):
        raise ConfigError("precision", f"auto follows accelerate's --mixed_precision, but {launcher!r} is not "
                                       f"one ganforge trains in (no, bf16, fp16); set precision explicitly")


def default_dtype(precision: str) -> torch.dtype:
    """The dtype networks and inputs are created in for a resolved precision."""
    return torch.float64 if precision == "fp64" else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or float64 if it is float64: autocast's bf16/fp16 outputs are widened for
    losses and statistics, a float64 run stays float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()  # float32: no call at all
