"""Fault injection: SIGKILL a 2-process job at random moments, restart it, and check nothing was lost.

A 2-process `ganforge launch` of configs/dcgan_digits.yaml (small widths) is killed N times
(--kills, default 30) with SIGKILL to every process group of the job (the launcher's, torchrun's
and the workers'), as a lost node or an OOM kill would, and restarted with the same command
each time until it finishes. A share of the kills lands during startup, most at a random step,
and at least a third while rank 0 writes a checkpoint: the test-only hook
GANFORGE_TEST_PAUSE_IN_SAVE (trainer/checkpoint.py) pauses inside every save, and such a kill
waits for a save's temporary directory to appear. Then:

- divergences: logged steps (every step, replayed ones included) whose losses differ from an
  uninterrupted run of the same command, plus tensors of the final checkpoint (G, D, G_ema,
  optimisers) that differ from its, bitwise (goal 0);
- lost_checkpoints: checkpoints that verified when the job was killed and are gone or invalid
  after the next attempt, other than by retention (`checkpoint.keep` newer valid ones), plus
  restarts that resumed from an older checkpoint than the newest valid one (goal 0).

Last stdout line: JSON with kills, kills_in_save (and where in the save), resumes, recovered
saves, divergences, lost_checkpoints, the seed of the kill moments, and wall times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SMALL = ["model.g_width=8", "model.d_width=8", "train.batch_size=16", "log.every_steps=1",
         "log.mlflow_uri=none", "log.sample_every_steps=100000", "checkpoint.keep=3"]
STEP_LINE = re.compile(r"ganforge: step (\d+)/", re.M)
RESUMED = re.compile(r"resuming from \S+ at step (\d+)")


def job_env(pause: float) -> dict[str, str]:
    """This environment without any launcher's variables, one thread a process, the save pause on."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PET_", "SLURM_", "JOB_COMPLETION_INDEX", "GANFORGE_", "WORLD_SIZE", "RANK",
                                "LOCAL_RANK", "MASTER_"))}
    return env | {"OMP_NUM_THREADS": "1", "GANFORGE_TEST_PAUSE_IN_SAVE": f"{pause:g}"}


def job_cmd(config: str, data: str, run: str, steps: int, every: int) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "ganforge")
    return [exe, "launch", "--nproc-per-node", "2", "--device", "cpu", "--max-restarts", "0", "--config", config,
            f"data.train={data}", f"run.dir={run}", *SMALL, f"train.max_steps={steps}",
            f"checkpoint.every_steps={every}"]


class Attempt:
    """One start of the job, in its own session, its output in a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: str):
        self.log = log
        self.t0 = time.monotonic()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)

    def text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def last_step(self) -> int:
        steps = STEP_LINE.findall(self.text())
        return int(steps[-1]) if steps else -1

    def kill(self) -> None:
        """SIGKILL every process group of the job at once, then wait until every process is gone."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        groups = set()
        for p in procs:
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                pass
        for group in groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:  # anything that left its group
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        psutil.wait_procs(procs, timeout=30)


def save_in_flight(ckpt_dir: str) -> str | None:
    """The temporary directory of the save being written, if any."""
    try:
        return next((n for n in os.listdir(ckpt_dir) if n.startswith(".tmp-")), None)
    except FileNotFoundError:
        return None


def valid_checkpoints(run: str) -> dict[int, str]:
    """step -> sha256 of the state file, for every checkpoint of `run` that verifies."""
    from trainer.checkpoint import CheckpointError, list_checkpoints, verify_checkpoint

    out = {}
    for step, path in list_checkpoints(run):
        try:
            verify_checkpoint(path)
            with open(os.path.join(path, "COMMITTED")) as f:
                out[step] = json.load(f)["files"]["state.pt"]["sha256"]
        except (CheckpointError, OSError, ValueError, KeyError):
            pass
    return out


def lost_between(before: dict[int, str], after: dict[int, str], keep: int) -> list[int]:
    """Steps valid before and gone after, where fewer than `keep` newer valid ones explain it."""
    return [s for s in before if s not in after and sum(1 for t in after if t > s) < keep]


def losses(run: str) -> tuple[list[tuple[int, dict[str, float]]], int]:
    """Every logged (step, losses) of metrics.jsonl in order, and the number of torn lines."""
    out, torn = [], 0
    for line in open(os.path.join(run, "metrics.jsonl")):
        try:
            rec = json.loads(line)
        except ValueError:
            torn += 1
            continue
        out.append((rec["step"], {k: v for k, v in rec.items() if k.startswith(("loss/", "d/"))}))
    return out, torn


def differing_tensors(a, b, name: str = "") -> list[str]:
    """Names of tensors (recursively) that are not bitwise equal between two checkpoint states."""
    import torch

    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            bool(torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                             b.view(-1).view(torch.uint8) if b.numel() else b))
        return [] if same else [name]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [name]
        return [d for k in a for d in differing_tensors(a[k], b[k], f"{name}.{k}" if name else str(k))]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [name]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differing_tensors(x, y, f"{name}[{i}]")]
    return []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/dcgan_digits.yaml")
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: drawn, and reported)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=10, help="checkpoint.every_steps")
    p.add_argument("--pause", type=float, default=0.3, help="seconds the test hook pauses in every save")
    p.add_argument("--keep-dir", action="store_true", help="keep the work directory (printed)")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    from trainer.checkpoint import read_checkpoint

    started = time.perf_counter()
    work = tempfile.mkdtemp(prefix="ganforge-bench-faults-")
    data = os.path.join(work, "data")
    from data_pipeline.sources import digits_source
    from data_pipeline.writer import write_shards

    src = digits_source(32)
    write_shards(src.samples, data, kind=src.kind, meta=src.meta)
    env = job_env(args.pause)
    keep = 3

    # The uninterrupted run; its time to the first step bounds the startup kills.
    ref_dir = os.path.join(work, "whole")
    ref = Attempt(job_cmd(args.config, data, ref_dir, args.steps, args.every), env, os.path.join(work, "whole.log"))
    first_step_s = None
    while ref.proc.poll() is None:
        if first_step_s is None and ref.last_step() >= 1:
            first_step_s = time.monotonic() - ref.t0
        time.sleep(0.05)
    reference_s = time.monotonic() - ref.t0
    if ref.proc.returncode != 0:
        sys.exit(f"the uninterrupted run failed (exit {ref.proc.returncode}); see {ref.log}")

    # Kill plan: kinds shuffled, target steps sorted so that the job makes progress between kills.
    n_save = max(math.ceil(args.kills / 3), round(0.4 * args.kills))
    n_start = min(round(0.1 * args.kills), args.kills - n_save)
    kinds = ["save"] * n_save + ["startup"] * n_start + ["step"] * (args.kills - n_save - n_start)
    rng.shuffle(kinds)
    targets = sorted(rng.randint(1, args.steps - 1) for _ in kinds)

    run = os.path.join(work, "run")
    ckpt_dir = os.path.join(run, "checkpoints")
    cmd = job_cmd(args.config, data, run, args.steps, args.every)
    stats = {"kills": 0, "kills_in_save": 0, "in_save_where": {"writing": 0, "no_marker": 0, "not_renamed": 0},
             "kills_at_startup": 0, "resumes": 0, "recovered": 0, "attempts": 0, "failed_attempts": 0}
    lost, stale_resumes, events = [], [], []
    before = valid_checkpoints(run)
    plan = list(zip(kinds, targets, strict=True))
    finished = False
    while not finished:
        stats["attempts"] += 1
        attempt = Attempt(cmd, env, os.path.join(work, f"attempt-{stats['attempts']:03d}.log"))
        kind, target = plan.pop(0) if plan else ("none", 0)
        deadline = time.monotonic() + 600
        if kind == "startup":
            time.sleep(rng.uniform(0.2, first_step_s or 5.0))
        while kind in ("step", "save") and attempt.proc.poll() is None and time.monotonic() < deadline:
            if attempt.last_step() >= target:
                break
            time.sleep(0.01)
        if kind == "step":
            time.sleep(rng.uniform(0, 0.2))
        if kind == "save":
            while attempt.proc.poll() is None and save_in_flight(ckpt_dir) is None and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 0.9 * args.pause))
        if kind != "none" and attempt.proc.poll() is None:
            attempt.kill()
            stats["kills"] += 1
            tmp = save_in_flight(ckpt_dir)
            if tmp:
                stats["kills_in_save"] += 1
                paused = f"save of step {int(tmp[10:18])}, state written" in attempt.text()
                where = "not_renamed" if os.path.exists(os.path.join(ckpt_dir, tmp, "COMMITTED")) else \
                    "no_marker" if paused else "writing"
                stats["in_save_where"][where] += 1
            if attempt.last_step() < 0 and not tmp:
                stats["kills_at_startup"] += 1
        else:
            attempt.proc.wait()
            if attempt.proc.returncode == 0:
                finished = True
            else:
                stats["failed_attempts"] += 1
                print(f"attempt {stats['attempts']} exited {attempt.proc.returncode}: see {attempt.log}",
                      file=sys.stderr, flush=True)
                if stats["failed_attempts"] > 3:
                    break
        text = attempt.text()
        resumed = RESUMED.search(text)
        stats["resumes"] += bool(resumed)
        stats["recovered"] += text.count("left by an interrupted save")
        if resumed and before and int(resumed.group(1)) < max(before):
            stale_resumes.append((stats["attempts"], int(resumed.group(1)), max(before)))
        after = valid_checkpoints(run)
        gone = lost_between(before, after, keep)
        lost += gone
        events.append({"attempt": stats["attempts"], "kind": kind, "target": target,
                       "reached": attempt.last_step(), "resumed": int(resumed.group(1)) if resumed else None,
                       "valid": sorted(after), "lost": gone})
        before = after

    ran, torn = losses(run)
    expected = dict(losses(ref_dir)[0])
    bad_steps = sorted({s for s, v in ran if expected.get(s) != v})
    final = f"checkpoints/step_{args.steps:08d}"
    bad_tensors = differing_tensors(read_checkpoint(os.path.join(ref_dir, final)),
                                    read_checkpoint(os.path.join(run, final))) if finished else ["(not finished)"]
    result = {"kills": stats["kills"], "kills_in_save": stats["kills_in_save"], "resumes": stats["resumes"],
              "divergences": len(bad_steps) + len(bad_tensors),
              "lost_checkpoints": len(lost) + len(stale_resumes),
              "in_save_where": stats["in_save_where"], "kills_at_startup": stats["kills_at_startup"],
              "recovered_saves": stats["recovered"], "attempts": stats["attempts"],
              "failed_attempts": stats["failed_attempts"], "finished": finished,
              "divergent_steps": bad_steps[:10], "divergent_tensors": bad_tensors[:10],
              "lost_steps": lost, "stale_resumes": stale_resumes, "logged_steps": len(ran), "torn_log_lines": torn,
              "seed": seed, "steps": args.steps, "every_steps": args.every, "pause_s": args.pause,
              "reference_s": round(reference_s, 1), "wall_s": round(time.perf_counter() - started, 1)}
    with open(os.path.join(work, "events.json"), "w") as f:
        json.dump(events, f, indent=1)
    if args.keep_dir or result["divergences"] or result["lost_checkpoints"] or not finished:
        print(f"work directory kept: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
