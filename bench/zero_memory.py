"""Per-rank optimiser memory of DDP vs ZeRO-1 vs ZeRO-2 (strategy=deepspeed), 2 processes on gloo.

The network is a DCGAN generator at 64x64 (g_width 176: 23M parameters) built by ganforge's
model code and set up through the trainer's own `make_phase`, as in a run. Each rank takes one
Adam step on a stand-in loss, then counts the bytes of the distinct tensors its optimiser holds:
the weights it updates (its param groups) and its state. Under DDP that is the whole fp32
model plus Adam's exp_avg and exp_avg_sq (12 bytes a parameter); under ZeRO-1/2 the rank's
partition of DeepSpeed's fp32 master copy, exp_avg and exp_avg_sq (12 / world size).
Gradients, activations and DeepSpeed's reduce bucket are not counted.

Run without arguments: it starts itself under torchrun. Last stdout line: JSON with the
figures per strategy and "ratio" = ZeRO-2 optimiser bytes / DDP optimiser bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STRATEGIES = {"ddp": {"strategy": "ddp"}, "zero1": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 1}},
              "zero2": {"strategy": "deepspeed", "deepspeed": {"zero_stage": 2}}}


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors` (views of one buffer count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_bytes(opt) -> int:
    """The weights a torch optimiser updates plus every tensor of its state."""
    import torch

    held = [p for group in opt.param_groups for p in group["params"]]
    held += [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v)]
    return tensor_bytes(held)


def measure(name: str, settings: dict, width: int, run_dir: str, env) -> dict[str, int]:
    """One Adam step of the generator under one strategy, on this rank."""
    import torch

    from trainer.config import Config, apply
    from trainer.core import make_optimizer
    from trainer.models import build_models
    from trainer.precision import resolve_precision
    from trainer.strategies import strategy

    cfg = apply(Config(), {"run": {"dir": os.path.join(run_dir, name)}, "train": {"batch_size": 4, "threads": 1},
                           "model": {"arch": "dcgan", "resolution": 64, "channels": 3, "g_width": width,
                                     "d_width": 8}, **settings})
    torch.manual_seed(0)
    g, _ = build_models(cfg.model)
    chosen, t = strategy(cfg.strategy), cfg.train  # what TrainerBase.make_phase does, without a trainer
    params = list(g.parameters())
    opt = make_optimizer(t.optimizer, params, 1e-4, (t.beta1, t.beta2), fused=chosen.FUSED_OPTIMIZER)
    phase = chosen.make_phase("G", g, params, opt, cfg, env, resolve_precision(cfg.precision, env.device))
    z = torch.randn(cfg.train.batch_size // env.world_size, cfg.model.z_dim)
    phase.backward(phase.module(z).float().square().mean())
    phase.apply()
    opt = getattr(phase.opt, "optimizer", phase.opt)  # DeepSpeed's ZeRO optimiser wraps a torch one
    model = phase.network
    return {"optimizer_bytes": optimizer_bytes(opt), "model_bytes": tensor_bytes(model.parameters()), "parameters": sum(p.numel() for p in model.parameters())}


def worker(width: int, out: str) -> None:
    import torch.distributed as dist

    from trainer.distributed import init_distributed

    env = init_distributed()
    with tempfile.TemporaryDirectory(prefix="ganforge-bench-zero-") as run_dir:
        figures = {name: measure(name, settings, width, run_dir, env) for name, settings in STRATEGIES.items()}
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, figures)
    if env.is_main:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--g-width", type=int, default=176)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_out:
        worker(args.g_width, args.worker_out)
        return
    out = tempfile.mktemp(prefix="ganforge-bench-zero-", suffix=".json")
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", "--nproc-per-node", str(args.nproc),
           os.path.abspath(__file__), "--g-width", str(args.g_width), "--worker-out", out]
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    ranks = json.load(open(out))
    os.remove(out)
    for name in STRATEGIES:
        per_rank = [r[name] for r in ranks]
        print(f"{name:6s} optimiser MB per rank: {[round(r['optimizer_bytes'] / 2**20, 1) for r in per_rank]}",
              flush=True)
    worst = {name: max(r[name]["optimizer_bytes"] for r in ranks) for name in STRATEGIES}
    result = {"world_size": args.nproc, "parameters": ranks[0]["ddp"]["parameters"],
              "model_bytes": ranks[0]["ddp"]["model_bytes"],
              **{f"{name}_optimizer_bytes": worst[name] for name in STRATEGIES},
              "ratio": round(worst["zero2"] / worst["ddp"], 4),
              "ratio_zero1": round(worst["zero1"] / worst["ddp"], 4)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
