"""The run loop: one rank of a training job, from the chosen checkpoint to the last step."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import torch.distributed as dist

from trainer.checkpoint import CheckpointManager, pick_checkpoint, read_init, set_aside_newer
from trainer.config import Config, dump_yaml
from trainer.core import TrainerBase
from trainer.distributed import (
    DistEnv,
    StopVotes,
    init_distributed,
    shutdown,
)
from trainer.families import family
from trainer.preemption import (
    LOST_WORKER_ERRORS,
    Preempted,
    StopFlag,
    data_marks,
    rewind_after_lost_worker,
)
from trainer.redact import redact
from trainer.reporting import Reporter

log = logging.getLogger(__name__)


def run_training(cfg: Config) -> dict[str, Any]:
    """Train per `cfg` in this process (one rank of the job); returns a summary on rank 0."""
    from trainer.run_lock import lock_run_dir

    env = init_distributed()
    lock = None
    try:
        lock = lock_run_dir(cfg.run.dir, env)  # one job per run.dir, before anything in it changes
        summary = _run(cfg, env)
        if env.world_size > 1:
            # Leave together: a rank tearing down gloo while a peer still talks to it can abort.
            dist.barrier()
        return summary
    finally:
        if lock:
            lock.release()
        shutdown()


def make_trainer(cfg: Config, env: DistEnv) -> TrainerBase:
    """The trainer for the config's model family (trainer/families/__init__.py)."""
    return family(cfg.model.arch).make_trainer(cfg, env)


def _run(cfg: Config, env: DistEnv) -> dict[str, Any]:
    trainer, resumed = start(cfg, env)
    reporter = Reporter(trainer, trainer.state.step if resumed else -1)
    if reporter.tracker:
        trainer.state.mlflow_run_id = reporter.tracker.wait_ready(timeout=30)
    ckpt = CheckpointManager(cfg.run.dir, cfg.checkpoint.keep, cfg.checkpoint.milestone_every,
                             resumed_from=resumed[0] if resumed else None, every_steps=cfg.checkpoint.every_steps,
                             saved_step=trainer.state.step if resumed else -1, on_save=reporter.checkpoint_model)
    reporter.watch_checkpoints(ckpt)
    flag = StopFlag().install()
    votes = StopVotes(env)
    started, status = time.perf_counter(), "FAILED"
    budget = cfg.train.max_minutes * 60
    try:
        redone = -1
        while trainer.state.step < cfg.train.max_steps:
            marks = data_marks(trainer)
            try:
                stats = trainer.train_step()
            except LOST_WORKER_ERRORS as e:
                # A loader worker lost during a stop must not cost the checkpoint: if the step had
                # not started, run it again on fresh workers, then stop at its boundary as usual.
                if not (flag.requested and redone != trainer.state.step and rewind_after_lost_worker(e, marks)):
                    raise
                redone = trainer.state.step
                log.warning("%s; stopping, step %d runs again on new loader workers", e, redone)
                continue
            reporter.log(stats)
            reporter.samples()
            if ckpt.due(trainer.state.step):
                ckpt.save_run(trainer)
            if reporter.evaluation_due(trainer.state.step):
                reporter.evaluate()
            # with more than one rank, agreed one step after they are cast (see StopVotes)
            preempt, over_budget, save_failed = votes(
                [flag.requested, budget > 0 and time.perf_counter() - started > budget, ckpt.failed])
            if save_failed:  # reported at the step after it happened, on every rank, not at the next save
                ckpt.raise_failed()
            if preempt:
                votes.settle()
                ckpt.save_run(trainer, blocking=True)
                status = "KILLED"
                raise Preempted(trainer.state.step, flag.signum or 15)
            if over_budget:
                if env.is_main:
                    log.info("time budget of %s min reached at step %d", cfg.train.max_minutes, trainer.state.step)
                break
        votes.settle()
        ckpt.save_run(trainer, blocking=True)
        grid = reporter.samples(final=True)
        status = "FINISHED"
    finally:
        flag.uninstall()
        reporter.close(status)
    summary = {"step": trainer.state.step, "checkpoint": ckpt.last_path or (resumed[0] if resumed else None),
               "samples": grid, "run_dir": cfg.run.dir, "mlflow_uri": reporter.uri,
               "mlflow_run_id": trainer.state.mlflow_run_id}
    if env.is_main:
        print_summary(summary)
    return summary


def start(cfg: Config, env: DistEnv) -> tuple[TrainerBase, tuple[str, dict[str, Any]] | None]:
    """The trainer, resumed from the chosen checkpoint (or initialised per checkpoint.init_from),
    and that checkpoint; rank 0 readies run.dir (config.yaml, newer checkpoints set aside)."""
    trainer = make_trainer(cfg, env)
    resumed = pick_checkpoint(cfg, env)
    if resumed:
        trainer.load_state_dict(resumed[1], resumed[0])
    elif cfg.checkpoint.init_from:  # a fresh run only: once it has checkpoints of its own, it resumes from them
        path, state = read_init(cfg.checkpoint.init_from)
        trainer.init_weights(state, path)
        if env.is_main:
            log.info("initialised the networks from %s", cfg.checkpoint.init_from)
    if env.is_main:
        os.makedirs(cfg.run.dir, exist_ok=True)
        set_aside_newer(cfg.run.dir, trainer.state.step if resumed else 0)  # not this run's past
        with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
            f.write(dump_yaml(redact(cfg)))  # the running process keeps the real values
        where = f"resuming from {resumed[0]} at step {trainer.state.step}" if resumed else "starting"
        log.info("%s; world size %d on %s, precision %s, global batch %d", where, env.world_size, env.device.type,
                 trainer.precision, cfg.train.batch_size)
    return trainer, resumed


def print_summary(s: dict[str, Any]) -> None:
    print(f"\nganforge: done at step {s['step']}", flush=True)
    if s["samples"]:
        print(f"  samples:     {s['samples']}")
    if s["checkpoint"]:
        print(f"  checkpoints: {os.path.dirname(s['checkpoint'])}")
    if s["mlflow_uri"]:
        print(f"  MLflow:      mlflow ui --backend-store-uri {redact(s['mlflow_uri'])}   (run {s['mlflow_run_id']})")
    sys.stdout.flush()
