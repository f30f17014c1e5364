"""Data-parallel strategies behind one interface: the `Phase` of trainer/core.py.

A strategy module exposes `make_phase(name, module, params, opt, cfg, env, precision) -> Phase`
and `FUSED_OPTIMIZER` (whether the trainer's Adam may use its fused kernel: DeepSpeed steps its
own flat partitions instead). The trainers only ever see the `Phase` it returns.
"""

from __future__ import annotations

import importlib
from types import ModuleType

STRATEGIES = {
    "ddp": "trainer.strategies.ddp",  # torch DistributedDataParallel (one process: the module itself)
    "deepspeed": "trainer.strategies.deepspeed",  # one DeepSpeed engine per network, ZeRO stage 1 or 2
}


def strategy(name: str) -> ModuleType:
    """The module of strategy `name` (config.py has checked the name), imported on first use."""
    return importlib.import_module(STRATEGIES[name])
