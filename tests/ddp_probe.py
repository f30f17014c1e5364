"""Run a few real training steps in this process of a DDP job and save what each rank holds.

Used by tests/test_training.py and tests/test_translation.py:
`accelerate launch ... tests/ddp_probe.py OUT [overrides]` (recipe: $PROBE_CONFIG, default
configs/dcgan_digits.yaml).
"""

from __future__ import annotations

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from trainer.distributed import init_distributed, shutdown  # noqa: E402
from trainer.families import load_config  # noqa: E402
from trainer.run import make_trainer  # noqa: E402


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(os.environ.get("PROBE_CONFIG", "configs/dcgan_digits.yaml"), overrides)
    env = init_distributed()
    trainer = make_trainer(cfg, env)
    init_g = {k: v.clone() for k, v in trainer.G.network.state_dict().items()}
    positions = []
    next_batch = trainer.data.next

    def recording_next():
        batch = next_batch()
        positions.extend(batch["position"].tolist())
        return batch

    trainer.data.next = recording_next
    steps = int(os.environ.get("PROBE_STEPS", "5"))
    for _ in range(steps):
        trainer.train_step()
    torch.save({
        "world_size": env.world_size,
        "device": env.device.type,
        "G": trainer.G.network.state_dict(),
        "D": trainer.D.network.state_dict(),
        "G_init": init_g,
        "positions": positions,
    }, os.path.join(out, f"rank{env.rank}.pt"))
    if env.world_size > 1:
        torch.distributed.barrier()  # leave together: tearing gloo down under a peer can abort it
    shutdown()


if __name__ == "__main__":
    main()
