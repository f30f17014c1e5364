"""Checkpoint cost on the DCGAN MNIST recipe's model: the whole cost of a save, in training steps.

The loop snapshots the state to CPU and writes it on a background thread. The stall (the time
the step loop is blocked) is not the whole cost: the steps that run beside the background write
are slowed by it. So each repetition times the same N steps twice, once saving every k steps
(waiting for the last write) and once without saving, and the whole cost per save is
(wall with saves - wall without) / saves, in step times (goal <= 1.0). Repetitions alternate
the two runs; figures are medians with their spread.

Last stdout line: JSON with step_s, cost_steps (the ratio), its spread, stall_s, write_s,
load_s and bytes (write_s: the last background write of each repetition).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dcgan_mnist.yaml")
    p.add_argument("--saves", type=int, default=4, help="saves per repetition")
    p.add_argument("--every", type=int, default=5, help="steps between saves")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    from bench.workspace import digits_workspace
    from trainer.checkpoint import CheckpointManager, load_latest, read_checkpoint
    from trainer.distributed import init_distributed
    from trainer.families.gan import GANTrainer

    torch.set_num_threads(args.threads)
    cfg, _ = digits_workspace(args.config, "checkpoint", "log.mlflow_uri=none")
    trainer = GANTrainer(cfg, init_distributed())
    for _ in range(5):  # warm-up
        trainer.train_step()
    n = args.saves * args.every

    def run(save: bool) -> tuple[float, list[float], list[float]]:
        ckpt_dir = os.path.join(cfg.run.dir, "bench")
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        ckpt = CheckpointManager(ckpt_dir, keep=2)
        stalls, writes = [], []
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            trainer.train_step()
            if save and i % args.every == 0:
                ckpt.save(trainer.state.step, trainer.state_dict())
                stalls.append(ckpt.last_stall_s)
        if save:
            ckpt.wait()
            writes.append(ckpt.last_write_s)
        return time.perf_counter() - t0, stalls, writes

    costs, steps, stalls, writes = [], [], [], []
    for _ in range(args.repeats):
        plain, _, _ = run(save=False)
        saving, st, wr = run(save=True)
        step_s = plain / n
        steps.append(step_s)
        costs.append((saving - plain) / args.saves / step_s)
        stalls += st
        writes += wr
    latest = load_latest(os.path.join(cfg.run.dir, "bench"))[0]
    t0 = time.perf_counter()
    trainer.load_state_dict(read_checkpoint(latest), latest)
    load_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(latest, f)) for f in os.listdir(latest))
    result = {"config": args.config, "saves": args.saves, "every": args.every, "repeats": args.repeats,
              "step_s": round(statistics.median(steps), 4), "cost_steps": round(statistics.median(costs), 3),
              "cost_steps_spread": [round(min(costs), 3), round(max(costs), 3)],
              "stall_s": round(statistics.median(stalls), 4), "write_s": round(statistics.median(writes), 4),
              "load_s": round(load_s, 4), "bytes": size}
    result["ratio"] = result["cost_steps"]
    print(f"step {result['step_s'] * 1000:.1f} ms; whole cost per save {result['cost_steps']:.2f} steps "
          f"({min(costs):.2f}..{max(costs):.2f}); stall {result['stall_s'] * 1000:.1f} ms, "
          f"write {result['write_s'] * 1000:.1f} ms, load {load_s * 1000:.1f} ms, {size / 1e6:.2f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
