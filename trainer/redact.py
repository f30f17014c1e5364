"""Credentials out of everything a run records or prints: config.yaml, checkpoints, MLflow, logs.

A URL's password (`user:password@`), a bare token in its user part, secret query parameters
(`token=`, `sig=`, `X-Amz-Signature=`, `key=`, ...) and `Bearer` tokens become `***`. The
running process keeps the real values; only what is written down is redacted.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TypeVar

from data_pipeline.redact import MASK, redact_text, redact_url

__all__ = ["MASK", "redact", "redact_text", "redact_url"]

T = TypeVar("T")


def redact(value: T) -> T:
    """A copy of `value` (str, dict, list, tuple, dataclass) with every string redacted."""
    if isinstance(value, str):
        return redact_text(value)  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)  # type: ignore[return-value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = copy.copy(value)
        for f in dataclasses.fields(value):
            setattr(out, f.name, redact(getattr(value, f.name)))
        return out
    return value

