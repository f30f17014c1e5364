"""StyleGAN2's regularisation phases on one global batch, in this process of a job; saves what rank 0 sees.

Used by tests/test_stylegan2.py: `python tests/stylegan2_probe.py OUT [overrides]` alone, or under
`accelerate launch` with several processes. Runs Greg (path length) and Dreg (R1, through the
augmentation at p = 0.5) once each and records the penalties (averaged over ranks), the running
mean path length and the gradients each optimiser steps with.
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from trainer.data import to_unit_range  # noqa: E402
from trainer.distributed import init_distributed, mean_across, shutdown  # noqa: E402
from trainer.families import load_config  # noqa: E402
from trainer.run import make_trainer  # noqa: E402


def record_grads(phase, into: list) -> None:
    """Keep a copy of the (rank-averaged) gradients each time `phase` steps."""
    apply = phase.apply

    def recording_apply():
        into.append([p.grad.detach().clone() for p in phase.network.parameters()])
        return apply()

    phase.apply = recording_apply


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config("configs/stylegan2_digits.yaml", overrides)
    env = init_distributed()
    trainer = make_trainer(cfg, env)
    trainer.ada.p = 0.5
    g_grads, d_grads = [], []
    record_grads(trainer.G, g_grads)
    record_grads(trainer.D, d_grads)
    real = to_unit_range(trainer.data.next()["image"])
    pl = trainer.g_reg().terms["loss/pl"]
    r1 = trainer.d_reg(real).terms["loss/r1"]
    result = {"pl": mean_across(pl.reshape(1), env), "r1": mean_across(r1.reshape(1), env),
              "pl_mean": trainer.pl_mean, "G_grads": g_grads[0], "D_grads": d_grads[0]}
    if env.is_main:
        torch.save(result, os.path.join(out, f"world{env.world_size}.pt"))
    if env.world_size > 1:
        torch.distributed.barrier()  # leave together: tearing gloo down under a peer can abort it
    shutdown()


if __name__ == "__main__":
    main()
