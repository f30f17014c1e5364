"""Checkpoint cost on the DCGAN demo model: training stall per save, background write time, load time.

The loop snapshots the state to CPU and writes it on a background thread; the stall is the
time the step loop is blocked. Target: stall <= one training step.

Last stdout line: JSON with step_s, stall_s, write_s, load_s, bytes and ratio (stall / step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dcgan_mnist.yaml")
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    from bench.workspace import digits_workspace
    from trainer.checkpoint import CheckpointManager, read_checkpoint
    from trainer.distributed import init_distributed
    from trainer.loop import Trainer

    torch.set_num_threads(args.threads)
    cfg, _ = digits_workspace(args.config, "checkpoint", "log.mlflow_uri=none")
    trainer = Trainer(cfg, init_distributed())
    for _ in range(5):  # warm-up
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(20):
        trainer.train_step()
    step_s = (time.perf_counter() - t0) / 20

    ckpt = CheckpointManager(cfg.run.dir, keep=2)
    stalls, writes = [], []
    for _ in range(args.saves):
        trainer.train_step()
        ckpt.save(trainer.state.step, trainer.state_dict())
        stalls.append(ckpt.last_stall_s)
        for _ in range(3):  # training goes on while the write happens
            trainer.train_step()
        ckpt.wait()
        writes.append(ckpt.last_write_s)
    path = ckpt.last_path
    t0 = time.perf_counter()
    trainer.load_state_dict(read_checkpoint(path), path)
    load_s = time.perf_counter() - t0
    size = os.path.getsize(os.path.join(path, "state.pt"))
    result = {"config": args.config, "step_s": round(step_s, 4), "stall_s": round(statistics.median(stalls), 4),
              "write_s": round(statistics.median(writes), 4), "load_s": round(load_s, 4), "bytes": size,
              "ratio": round(statistics.median(stalls) / step_s, 3)}
    print(f"step {step_s * 1000:.1f} ms, stall {result['stall_s'] * 1000:.1f} ms, "
          f"write {result['write_s'] * 1000:.1f} ms, load {load_s * 1000:.1f} ms, {size / 1e6:.2f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
