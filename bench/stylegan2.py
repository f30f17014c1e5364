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
    p.add_argument("--config", default="configs/stylegan2_digits.yaml",
                   help="recipe; any other than the digits one trains on random in-memory images of its size")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the recipe")
    args = p.parse_args()

    from trainer.data import DataCursor
    from trainer.distributed import DistEnv
    from trainer.families.stylegan2 import StyleGAN2Trainer

    device = torch.device(args.device)
    cfg, _ = digits_workspace(args.config, "stylegan2", f"train.threads={args.threads}", "log.mlflow_uri=none",
                              *args.overrides)
    if args.config != "configs/stylegan2_digits.yaml":  # its images: random uint8 of the recipe's size
        m = cfg.model
        batch = torch.randint(0, 256, (cfg.train.batch_size, m.channels, m.resolution, m.resolution),
                              dtype=torch.uint8, device=device)
        DataCursor.next = lambda self: {"image": batch}
    trainer = StyleGAN2Trainer(cfg, DistEnv(0, 1, 0, device))
    trainer.ada.p = args.augment_p
    trainer.ada.adaptive = False  # hold p, so every run times the same work
    for _ in range(args.warmup):
        trainer.train_step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    sync()
    seconds = time.perf_counter() - start
    images = args.steps * cfg.train.batch_size
    result = {"sec_per_kimg": round(seconds / images * 1000, 2), "img_per_s": round(images / seconds, 1),
              "step_ms": round(seconds / args.steps * 1000, 1), "steps": args.steps, "batch": cfg.train.batch_size,
              "threads": args.threads, "augment_p": args.augment_p, "config": args.config,
              "resolution": cfg.model.resolution, "precision": trainer.precision,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None}
    print(f"StyleGAN2 {args.config}, 1 process on {result['device']}, {trainer.precision}: "
          f"{result['sec_per_kimg']} sec/kimg ({result['img_per_s']} img/s)", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
