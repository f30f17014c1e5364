"""GPU throughput of DCGAN 64x64: the ganforge step against hand-written loops on the same GPU.

Variants, all training configs/dcgan64.yaml's networks (full DCGAN widths) on the same random
in-memory uint8 batches, so only the step differs (the hand-written loops are bench/hand_written.py's,
which bench/overhead.py times on the CPU):
- `examples_fp32`: the pytorch/examples dcgan loop as users write it (fp32; D's real and fake
  terms backpropagated one after the other, D's weight gradients computed in the G step, as
  there);
- `tight_bf16_cl`: the tightest hand-written loop doing ganforge's work: bf16 autocast,
  channels_last, D frozen in the G step, the D step's fake reused, gradients set to None,
  fused Adam, and the recipe's EMA of G (one fused lerp, one fused buffer copy);
  (compiled variants keep the default layout on both sides: inductor chooses conv layouts);
- `ganforge_bf16_cl`: the real `Trainer.train_step` with precision=bf16 and channels_last;
- the last two again with torch.compile (`*_compile`) in `--compile-mode` (default reduce-overhead,
  meant to replay each network's forward and backward as CUDA graphs and so remove their launch
  cost; ganforge's is `train.compile=true train.compile_mode=...`), unless --no-compile.
The eager variants are built, warmed up and timed first (`--repeats` alternating windows of
`--steps` steps), then profiled if asked, and their figures printed as a JSON line of their own
(with "partial"), so that they survive a caller's time limit while the compiled variants
compile. Then every variant, eager and compiled, is timed again in alternating windows for the
final figures; each is the median window with its spread (min..max).

`--profile DIR` also records one window of the tight loop and of ganforge with torch.profiler:
the 40 costliest operators by host time go to DIR/<variant>.txt, and the JSON gets each one's
host-side synchronisations per step (cudaStreamSynchronize, cudaDeviceSynchronize, and
cudaMemcpy calls that block) and kernel launches per step.

Needs a CUDA device; `--allow-cpu` runs the same code on the CPU as a smoke test (the figures
then mean nothing for GPUs). Last stdout line: JSON with each variant and
`ratio_examples` = ganforge (best) / examples_fp32 (goal >= 1.5),
`ratio_tight` = ganforge_bf16_cl / tight_bf16_cl (goal >= 0.95),
`ratio_tight_compile` = ganforge_bf16_cl_compile / tight_bf16_cl_compile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import typing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.hand_written import dcgan_step  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def window(step, steps: int, device: torch.device) -> float:
    """Seconds per step over one window of `steps` steps."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - t0) / steps


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile(step, steps: int, device: torch.device, path: str) -> dict:
    """Host-side synchronisations and kernel launches per step in one window, and the costliest
    operators by host time (written to `path`)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profiler(activities=activities) as prof:
        window(step, steps, device)
    events = prof.key_averages()
    with open(path, "w") as f:
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40))
        if device.type == "cuda":
            f.write("\n" + events.table(sort_by="self_device_time_total", row_limit=40))
    count = lambda names: sum(e.count for e in events if e.key in names) / (steps + 0.0)  # noqa: E731
    kernels = sorted(((e.self_device_time_total / steps / 1000, e.key) for e in events
                      if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0), reverse=True)
    # the window's own synchronize before and after is one cudaDeviceSynchronize each: not the step's
    return {"syncs_per_step": round(count(SYNCS) - 2 / steps * (device.type == "cuda"), 2),
            "launches_per_step": round(count(LAUNCHES), 1),
            "gpu_busy_ms_per_step": round(sum(ms for ms, _ in kernels), 3),
            "top_kernels_ms_per_step": [[name[:90], round(ms, 3)] for ms, name in kernels[:20]]}


def ganforge_step(cfg, batch: torch.Tensor, device: torch.device):
    from trainer.data import DataCursor
    from trainer.distributed import DistEnv
    from trainer.families.gan import GANTrainer

    labels = torch.zeros(batch.shape[0], dtype=torch.int64)
    if device.type == "cuda":  # as the loader's pinned batches: a pageable copy would block the host
        labels = labels.pin_memory()
    DataCursor.next = lambda self: {"image": batch.to(device, non_blocking=True),
                                    "label": labels.to(device, non_blocking=True)}
    return GANTrainer(cfg, DistEnv(0, 1, 0, device)).train_step


def compile_modes() -> tuple[str, ...]:
    from trainer.config import TrainConfig

    return typing.get_args(typing.get_type_hints(TrainConfig)["compile_mode"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="alternating windows per variant")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    p.add_argument("--compile-mode", default="reduce-overhead", choices=compile_modes(),
                   help="torch.compile mode of the compiled variants (train.compile_mode's choices)")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU (smoke test only)")
    p.add_argument("--profile", metavar="DIR", help="profile one window of the tight loop and of ganforge into DIR")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.allow_cpu:
        sys.exit("bench/gpu.py: no CUDA device here; run it on a GPU machine (or --allow-cpu for a smoke test)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from bench.workspace import digits_workspace

    base = ["model.resolution=64", "model.channels=3", "log.mlflow_uri=none", f"train.batch_size={args.batch}"]
    make_cfg = lambda *extra: digits_workspace("configs/dcgan64.yaml", "gpu", *base, *extra)[0]  # noqa: E731
    batch = torch.randint(0, 256, (args.batch, 3, 64, 64), dtype=torch.uint8)
    if device.type == "cuda":
        batch = batch.pin_memory()
    images = lambda: batch  # noqa: E731  (the same pinned batch every step)
    builders = {
        "examples_fp32": lambda: dcgan_step(make_cfg(), images, device, tight=False),
        # channels_last as ganforge uses it: not under compile (inductor picks conv layouts itself)
        "tight_bf16_cl": lambda: dcgan_step(make_cfg(), images, device, tight=True, autocast=torch.bfloat16,
                                            channels_last=True),
        "ganforge_bf16_cl": lambda: ganforge_step(make_cfg("precision=bf16"), batch, device),
    }
    compiled = {} if args.no_compile else {
        "tight_bf16_cl_compile": lambda: dcgan_step(make_cfg(), images, device, tight=True, autocast=torch.bfloat16,
                                                    compile_mode=args.compile_mode),
        "ganforge_bf16_cl_compile": lambda: ganforge_step(
            make_cfg("precision=bf16", "train.compile=true", f"train.compile_mode={args.compile_mode}"), batch, device),
    }
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
                    "compile_mode": None if args.no_compile else args.compile_mode}
    steps, peaks = build(builders, args.warmup, device, result)
    time_windows(steps, peaks, args, device, result)
    profiles = {}
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        profiles = {name: profile(steps[name], args.steps, device, os.path.join(args.profile, f"{name}.txt"))
                    for name in ("tight_bf16_cl", "ganforge_bf16_cl") if name in steps}
    for name, counts in profiles.items():
        result[name] |= counts
    if compiled:  # the eager figures on a line of their own first: compiling may outlast a caller's time limit
        print(json.dumps(result | {"partial": "eager variants only; the compiled ones were being built"}), flush=True)
        steps2, peaks2 = build(compiled, args.warmup, device, result)
        steps, peaks = steps | steps2, peaks | peaks2
        time_windows(steps, peaks, args, device, result)  # every variant again, alternating, for the final figures
        for name, counts in profiles.items():
            result[name] |= counts
    print(json.dumps(result))
    if len(steps) < len(builders) + len(compiled):
        sys.exit(1)


def build(builders: dict, warmup: int, device: torch.device, result: dict) -> tuple[dict, dict]:
    """Each variant built and warmed up: (its step, peak memory in MiB); a variant that fails is
    reported in `result` and the others still run."""
    steps, peaks = {}, {}
    for name, make in builders.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            steps[name] = make()
            window(steps[name], warmup, device)
        except Exception as e:  # noqa: BLE001  (any failure of one variant is a finding, not the end)
            steps.pop(name, None)
            result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            print(f"{name}: FAILED: {result[name]['error']}", flush=True)
            continue
        peaks[name] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
        print(f"{name}: built and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
    return steps, peaks


def time_windows(steps: dict, peaks: dict, args, device: torch.device, result: dict) -> None:
    """`args.repeats` alternating windows of every step in `steps`; each variant's median and spread,
    and the ratios between variants timed here, into `result`."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            times[name].append(window(step, args.steps, device))
    for name, ts in times.items():
        rates = sorted(args.batch / t for t in ts)
        result[name] = {"img_s": round(statistics.median(rates), 1), "spread": [round(rates[0], 1), round(rates[-1], 1)],
                        "step_ms": round(statistics.median(ts) * 1000, 2), "peak_mem_mb": round(peaks[name], 1)}
        print(f"{name:>26}: {result[name]}", flush=True)
    img = {name: result[name]["img_s"] for name in times}
    ours = [v for k, v in img.items() if k.startswith("ganforge")]
    if ours and "examples_fp32" in img:
        result["ratio_examples"] = round(max(ours) / img["examples_fp32"], 3)
    for key, a, b in (("ratio_tight", "ganforge_bf16_cl", "tight_bf16_cl"),
                      ("ratio_tight_compile", "ganforge_bf16_cl_compile", "tight_bf16_cl_compile")):
        if a in img and b in img:
            result[key] = round(img[a] / img[b], 3)

if __name__ == "__main__":
    main()
