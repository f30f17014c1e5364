"""Training-loop overhead: the ganforge loop vs a bare pytorch/examples-style DCGAN loop.

Both train the same DCGAN (configs/dcgan_digits.yaml: 32x32, batch 64, fp32, one CPU process)
on the same in-memory uint8 batches, so only the loops differ. The ganforge side runs the
real loop (`trainer.loop._run`) with everything at its default cadence: MLflow (sqlite),
progress lines, metrics.jsonl, EMA, sample grids and background checkpoints; only the data
cursor is swapped for the in-memory batches (the loader has its own benchmark). Steps after
a warm-up are timed from the start of one step to the start of the last one, so periodic
work between steps is included.

Last stdout line: JSON with both images/s and ratio = ganforge / bare.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def in_memory_batches(data_dir: str, batch: int, n: int) -> list[dict[str, torch.Tensor]]:
    from data_pipeline.loader import ShardStream, StreamSpec, make_loader

    stream = ShardStream(data_dir, StreamSpec(seed=0, batch_size=batch))
    return list(itertools.islice(make_loader(stream), n))


def bare_loop(cfg, batches, steps: int, warmup: int) -> float:
    """pytorch/examples dcgan/main.py's loop (with logits), on the same models and batches."""
    from trainer.models import build_models

    torch.manual_seed(0)
    g, d = build_models(cfg.model)
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.train.lr_d, betas=(cfg.train.beta1, cfg.train.beta2))
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.train.lr_g, betas=(cfg.train.beta1, cfg.train.beta2))
    t0 = 0.0
    for i, batch in enumerate(itertools.islice(itertools.cycle(batches), steps + warmup)):
        if i == warmup:
            t0 = time.perf_counter()
        real = batch["image"].float() / 127.5 - 1
        b = real.shape[0]
        d.zero_grad()
        out = d(real)
        F.binary_cross_entropy_with_logits(out, torch.ones(b)).backward()
        fake = g(torch.randn(b, cfg.model.z_dim))
        out = d(fake.detach())
        F.binary_cross_entropy_with_logits(out, torch.zeros(b)).backward()
        opt_d.step()
        g.zero_grad()
        out = d(fake)
        F.binary_cross_entropy_with_logits(out, torch.ones(b)).backward()
        opt_g.step()
    return steps * cfg.train.batch_size / (time.perf_counter() - t0)


def ganforge_loop(cfg, batches, steps: int, warmup: int) -> float:
    from trainer import loop
    from trainer.data import DataCursor
    from trainer.distributed import DistEnv

    feed = itertools.cycle(batches)
    marks: list[float] = []
    original_step = loop.Trainer.train_step

    def timed_step(self):
        marks.append(time.perf_counter())
        return original_step(self)

    DataCursor.next = lambda self: dict(next(feed))
    loop.Trainer.train_step = timed_step
    cfg.train.max_steps = steps + warmup + 1
    with contextlib.redirect_stdout(io.StringIO()):
        loop._run(cfg, DistEnv(0, 1, 0, torch.device("cpu")))
    return steps * cfg.train.batch_size / (marks[-1] - marks[warmup])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dcgan_digits.yaml")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from bench.workspace import digits_workspace

    cfg, data = digits_workspace(args.config, "overhead")
    batches = in_memory_batches(data, cfg.train.batch_size, 20)
    bare = bare_loop(cfg, batches, args.steps, args.warmup)
    ours = ganforge_loop(cfg, batches, args.steps, args.warmup)
    result = {"config": args.config, "steps": args.steps, "batch": cfg.train.batch_size,
              "bare_img_s": round(bare, 1), "ganforge_img_s": round(ours, 1), "ratio": round(ours / bare, 3)}
    print(f"bare loop {bare:.0f} img/s, ganforge loop {ours:.0f} img/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
