"""Training-loop overhead: the ganforge loop vs the tightest hand-written DCGAN loop and vs pytorch/examples'.

All three train the same DCGAN (configs/dcgan_digits.yaml: 32x32, batch 64, fp32, one CPU
process) on the same in-memory uint8 batches, so only the loops differ:
- `tight`: the tightest hand-written loop doing the recipe's work (one D backward, the D step's
  fake reused, D frozen and unwrapped in the G step so only G's gradients flow and are reduced,
  no buffer broadcasts under DDP, fused Adam as ganforge uses it, and the recipe's EMA of G);
- `examples`: pytorch/examples dcgan/main.py's loop as users write it;
(both from bench/hand_written.py, which builds the same loops for bench/gpu.py on a GPU)
- `ganforge`: the real loop (`trainer.run._run`) with everything at its default cadence:
  MLflow (sqlite), progress lines, metrics.jsonl, EMA, sample grids and background checkpoints;
  only the data cursor is swapped for the in-memory batches (the loader has its own benchmark).
The three take turns in blocks of `--block` steps within one ganforge run: every `--block`
ganforge steps the run pauses, once its background work is done (checkpoint written, MLflow
queue sent), and each hand-written loop takes `--block` steps, in alternating order. So all
three meet the same machine conditions within seconds of each other (on a shared VM a loop's
rate spreads by up to 25 % over the repetitions of one invocation), and ganforge's time, from the end of one pause to the
start of the next, includes everything its loop and its threads do between steps. A repetition
is `--steps` steps of each loop, by default one whole cadence period of the config (the least
common multiple of its log, sample and checkpoint intervals: 200 steps with 8 log lines, one
sample grid and one checkpoint); each ratio is the median of the per-repetition ratios, with
their spread.

With `--processes 2` the same comparison runs as a 2-process DDP job (torchrun, gloo on CPU, one
thread per process, global batch 64); the hand-written loops wrap G and D in DDP.

Last stdout line: JSON with the images/s of each loop (median and spread), `ratio_tight` =
ganforge / tight (goal >= 0.95) and `ratio_examples` = ganforge / examples; with one process also
`ops_per_step_tight` and `ops_per_step_ganforge`, the operator calls each step makes from Python
(counted, not timed: the host work that bounds a step on a fast GPU), and `host_us_per_step_*`
with `host_extra_us_per_step`: the two steps timed at tiny sizes (widths 2, batch 2, one thread),
where a step's time is its host work, and how much more of it ganforge's step takes (median of
the paired differences of `--host-steps` steps taken alternately, one of each at a time); with
more than one process, `votes_allreduce_us` and `buffer_mean_us` (each with `_mean`): what one
call of the collectives ganforge's step makes beyond the tight loop's costs (see collective_us).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.hand_written import dcgan_step  # noqa: E402


def in_memory_batches(data_dir: str, batch: int, n: int, rank: int = 0, world: int = 1) -> list[dict[str, torch.Tensor]]:
    from data_pipeline.loader import ShardStream, StreamSpec, make_loader

    stream = ShardStream(data_dir, StreamSpec(seed=0, batch_size=batch // world, rank=rank, world_size=world))
    return list(itertools.islice(make_loader(stream), n))


def examples_step(cfg, batches, ddp: bool = False):
    """One step of pytorch/examples dcgan/main.py's loop as users write it (bench/hand_written.py),
    on the CPU, over `batches` in turn."""
    return dcgan_step(cfg, images_from(batches), torch.device("cpu"), tight=False, ddp=ddp)


def tight_step(cfg, batches, ddp: bool = False):
    """One step of the tightest hand-written loop doing the recipe's work (bench/hand_written.py), on
    the CPU in fp32, over `batches` in turn."""
    return dcgan_step(cfg, images_from(batches), torch.device("cpu"), tight=True, ddp=ddp)


def images_from(batches):
    """The images of `batches`, one batch a call, in turn."""
    feed = itertools.cycle(batches)
    return lambda: next(feed)["image"]


def ops_per_step(step, steps: int = 5) -> float:
    """Operator calls made from Python per step (each a host-side dispatch; on a GPU most launch a
    kernel): the profiler's aten events not nested in another aten event, after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(top) / steps


HOST_SIZES = ("model.g_width=2", "model.d_width=2", "model.z_dim=4", "train.batch_size=2", "log.mlflow_uri=none")


def host_time(config: str, steps: int) -> dict:
    """Microseconds per step of the tight loop's step and ganforge's `train_step` at tiny sizes
    (HOST_SIZES: widths 2, batch 2, one thread), where the arithmetic is negligible and a step's
    time is its host work: Python, dispatch and each operator's fixed cost, as on a GPU that
    outruns the host. The two steps alternate one by one (every other pair in reverse order),
    `steps` times, so both meet the same machine conditions; each figure is a median over single
    steps (the extra time: of the paired differences, with their quartiles), which a burst of
    other work on the machine barely moves."""
    from bench.workspace import digits_workspace

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg, data = digits_workspace(config, "host", *HOST_SIZES)
        batches = in_memory_batches(data, cfg.train.batch_size, 20)
        pair = {"tight": tight_step(cfg, batches), "ganforge": ganforge_step(cfg, batches)}
        for _ in range(30):  # warm-up
            pair["tight"](), pair["ganforge"]()
        times: list[tuple[float, float]] = []
        for i in range(steps):
            took = {}
            for name in list(pair)[::-1 if i % 2 else 1]:  # every other pair in reverse order
                t0 = time.perf_counter()
                pair[name]()
                took[name] = time.perf_counter() - t0
            times.append((took["tight"], took["ganforge"]))
    finally:
        torch.set_num_threads(threads)
    extra = sorted(g - t for t, g in times)
    us = lambda x: round(x * 1e6, 1)  # noqa: E731
    return {"host_us_per_step_tight": us(statistics.median(t for t, _ in times)),
            "host_us_per_step_ganforge": us(statistics.median(g for _, g in times)),
            "host_extra_us_per_step": us(statistics.median(extra)),
            "host_extra_us_per_step_quartiles": [us(extra[len(extra) // 4]), us(extra[3 * len(extra) // 4])]}


def collective_us(cfg, env, calls: int = 500) -> dict:
    """Microseconds per call (median and mean over `calls`, every rank starting together) of the
    collectives a 2-process ganforge step makes that the tight loop does not: the mean of the BN
    statistics over ranks (BufferMean over the recipe's G and D), and a 3-float all-reduce waited
    for, the size of the stop votes (which ganforge now runs in the background)."""
    from trainer.distributed import BufferMean
    from trainer.models import build_models

    dist = torch.distributed
    votes, buffer_mean = torch.zeros(3), BufferMean(env, *build_models(cfg.model))
    out = {}
    for name, call in (("votes_allreduce", lambda: dist.all_reduce(votes, op=dist.ReduceOp.MAX)),
                       ("buffer_mean", buffer_mean)):
        dist.barrier()
        took = []
        for _ in range(calls):
            t0 = time.perf_counter()
            call()
            took.append(time.perf_counter() - t0)
        out[f"{name}_us"] = round(statistics.median(took) * 1e6, 1)
        out[f"{name}_us_mean"] = round(statistics.mean(took) * 1e6, 1)
    return out


def serve_from_memory(batches) -> None:
    """Every DataCursor from now on hands out `batches` in turn (the loader has its own benchmark)."""
    from trainer.data import DataCursor

    feed = itertools.cycle(batches)
    DataCursor.next = lambda self: dict(next(feed))


def ganforge_step(cfg, batches):
    """ganforge's train_step (of a fresh one-process trainer) on the in-memory batches."""
    from trainer.distributed import DistEnv
    from trainer.families.gan import GANTrainer

    serve_from_memory(batches)
    return GANTrainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"))).train_step


def cadence(cfg) -> int:
    """Steps in one whole period of the run's periodic work: the least common multiple of the log,
    sample, checkpoint and evaluation intervals (those that are on)."""
    every = [cfg.log.every_steps, cfg.log.sample_every_steps, cfg.checkpoint.every_steps, cfg.eval.every_steps]
    return math.lcm(*[e for e in every if e > 0])


@contextlib.contextmanager
def instances(*classes):
    """The objects of `classes` constructed while inside (a list that fills as they are)."""
    made: list = []
    inits = {c: c.__init__ for c in classes}

    def recording(init):
        def record(self, *args, **kwargs):
            init(self, *args, **kwargs)
            made.append(self)
        return record

    for c, init in inits.items():
        c.__init__ = recording(init)
    try:
        yield made
    finally:
        for c, init in inits.items():
            c.__init__ = init


def interleaved_rates(cfg, batches, repeats: int, steps: int, block: int, warmup: int, env=None) -> dict[str, list[float]]:
    """Images/s of each loop in each of `repeats` repetitions of `steps` steps, the three loops
    taking turns in blocks of `block` steps within one real ganforge run (`trainer.run._run`).

    At every `block`-th ganforge step the run pauses and the two hand-written loops each take
    `block` steps (their order alternating from one pause to the next) before ganforge goes on.
    ganforge's time runs from the end of one pause to the start of the next, and the pause
    starts only once ganforge's background work is done (its checkpoint written, its MLflow
    queue sent; under DDP every rank is at a barrier), so what its threads do is charged to
    ganforge and never to a hand-written loop. A repetition is a whole cadence period by default,
    so each holds its share of log steps, sample grids and checkpoints.
    """
    from trainer import run
    from trainer.checkpoint import CheckpointManager
    from trainer.distributed import DistEnv
    from trainer.families.gan import GANTrainer
    from trainer.telemetry.mlflow import MlflowTracker

    if steps % block:
        raise SystemExit(f"--steps {steps} is not a multiple of --block {block}")
    ddp = env is not None
    hand = {"examples": examples_step(cfg, batches, ddp), "tight": tight_step(cfg, batches, ddp)}
    seconds = {name: [0.0] * repeats for name in ("examples", "tight", "ganforge")}
    resumed = [0.0]  # when ganforge's clock last started
    original_step = GANTrainer.train_step

    def settle(made) -> None:
        for obj in made:
            if isinstance(obj, CheckpointManager):
                obj.wait()
            elif not obj.flush(timeout=600):
                raise SystemExit("the MLflow thread did not drain within 600 s")
        if ddp:
            torch.distributed.barrier()

    def taking_turns(self):
        done = self.state.step - warmup  # timed ganforge steps done
        if done == 0:
            for step in hand.values():
                for _ in range(warmup):
                    step()
            resumed[0] = time.perf_counter()
        elif done > 0 and done % block == 0:
            settle(made)
            rep = (done - 1) // steps
            seconds["ganforge"][rep] += time.perf_counter() - resumed[0]
            for name in list(hand)[::-1 if done // block % 2 else 1]:
                t0 = time.perf_counter()
                for _ in range(block):
                    hand[name]()
                seconds[name][rep] += time.perf_counter() - t0
            resumed[0] = time.perf_counter()
        return original_step(self)

    serve_from_memory(batches)
    cfg.train.max_steps = warmup + repeats * steps + 1
    GANTrainer.train_step = taking_turns
    try:
        with instances(CheckpointManager, MlflowTracker) as made, contextlib.redirect_stdout(io.StringIO()):
            run._run(cfg, env or DistEnv(0, 1, 0, torch.device("cpu")))
    finally:
        GANTrainer.train_step = original_step
    return {name: [steps * cfg.train.batch_size / s for s in secs] for name, secs in seconds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dcgan_digits.yaml")
    p.add_argument("--steps", type=int, default=0,
                   help="timed steps of each loop per repetition (default: one cadence period of the config)")
    p.add_argument("--block", type=int, default=25, help="steps each loop takes in a turn")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7, help="repetitions (ratios per repetition, then the median)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (per process with --nproc)")
    p.add_argument("--processes", type=int, default=1, help="2: compare DDP loops under torchrun")
    p.add_argument("--host-steps", type=int, default=3000, help="alternating steps of the host-time comparison")
    args = p.parse_args()
    if args.processes > 1 and "WORLD_SIZE" not in os.environ:
        import subprocess

        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}",
               os.path.abspath(__file__), *sys.argv[1:]]
        sys.exit(subprocess.call(cmd, env=env))
    torch.set_num_threads(args.threads if args.processes == 1 else 1)
    from bench.workspace import digits_workspace
    from trainer.distributed import init_distributed

    dist_env = init_distributed() if args.processes > 1 else None
    rank, world = (dist_env.rank, dist_env.world_size) if dist_env else (0, 1)
    cfg, data = digits_workspace(args.config, "overhead")
    cfg.run.dir += f"-ddp{world}" if dist_env else ""
    batches = in_memory_batches(data, cfg.train.batch_size, 20, rank, world)
    steps = args.steps or cadence(cfg)
    rates = interleaved_rates(cfg, batches, args.repeats, steps, args.block, args.warmup, dist_env)
    collectives = collective_us(cfg, dist_env) if dist_env else {}
    if rank == 0:
        med = {k: statistics.median(v) for k, v in rates.items()}
        result = {"config": args.config, "steps": steps, "block": args.block, "repeats": args.repeats,
                  "batch": cfg.train.batch_size,
                  "processes": world, "threads": args.threads if world == 1 else 1}
        for k, v in rates.items():
            result[f"{k}_img_s"] = round(med[k], 1)
            result[f"{k}_spread"] = [round(min(v), 1), round(max(v), 1)]
        ratios = {name: [o / b for o, b in zip(rates["ganforge"], rates[name], strict=True)]
                  for name in ("tight", "examples")}
        for name, rs in ratios.items():  # per repetition, then the median: pairs share machine conditions
            result[f"ratio_{name}"] = round(statistics.median(rs), 3)
            result[f"ratio_{name}_spread"] = [round(min(rs), 3), round(max(rs), 3)]
        if world == 1:  # how much host-side work each step asks for: counted, then timed at tiny sizes
            result["ops_per_step_tight"] = ops_per_step(tight_step(cfg, batches))
            result["ops_per_step_ganforge"] = ops_per_step(ganforge_step(cfg, batches))
            result |= host_time(args.config, args.host_steps)
        result |= collectives
        print(f"examples loop {med['examples']:.0f} img/s, tight loop {med['tight']:.0f} img/s, "
              f"ganforge loop {med['ganforge']:.0f} img/s ({world} process(es), {args.repeats} repetitions)")
        print(json.dumps(result), flush=True)
    if dist_env:
        from trainer.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    main()
