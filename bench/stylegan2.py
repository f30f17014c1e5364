"""StyleGAN2 + ADA training speed on CPU in sec/kimg (seconds per thousand real images shown to D).

Trains configs/stylegan2_digits.yaml (32x32, G/D at most 32 maps, batch 32, fp32, one process)
on sklearn's digits with the real trainer (`StyleGAN2Trainer.train_step`: Gmain, Greg every 4
steps, Dmain, Dreg every 16, ADA, EMA). Steps after a warm-up are timed over a multiple of 16
steps, so each lazy regulariser runs its share. sec/kimg is StyleGAN2-ADA's speed unit.

Last stdout line: JSON {"sec_per_kimg", "img_per_s", "step_ms", "steps", "batch", "threads", "augment_p"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.workspace import digits_workspace  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=48, help="timed steps (a multiple of 16 keeps R1's share right)")
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--augment-p", type=float, default=0.2, help="ADA's p during the timing (it costs time)")
    args = p.parse_args()

    from trainer.distributed import DistEnv
    from trainer.stylegan2_trainer import StyleGAN2Trainer

    cfg, _ = digits_workspace("configs/stylegan2_digits.yaml", "stylegan2", f"train.threads={args.threads}",
                              "log.mlflow_uri=none")
    trainer = StyleGAN2Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    trainer.ada.p = args.augment_p
    trainer.ada.adaptive = False  # hold p, so every run times the same work
    for _ in range(args.warmup):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    seconds = time.perf_counter() - start
    images = args.steps * cfg.train.batch_size
    result = {"sec_per_kimg": round(seconds / images * 1000, 2), "img_per_s": round(images / seconds, 1),
              "step_ms": round(seconds / args.steps * 1000, 1), "steps": args.steps, "batch": cfg.train.batch_size,
              "threads": args.threads, "augment_p": args.augment_p}
    print(f"StyleGAN2 digits recipe, 1 CPU process, {args.threads} thread(s): {result['sec_per_kimg']} sec/kimg "
          f"({result['img_per_s']} img/s)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
