"""What the run loop asks its components: the data cursor's waits, the sinks' records, when to checkpoint."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import free_port

RECIPE = "configs/dcgan_digits.yaml"
TINY = ["model.g_width=8", "model.d_width=8", "model.z_dim=16", "train.batch_size=16", "log.mlflow_uri=none",
        "data.num_workers=0", "train.threads=1"]


def cpu_env():
    from trainer.distributed import DistEnv

    return DistEnv(0, 1, 0, torch.device("cpu"))


def test_data_cursor_times_its_own_waits_and_counts_images(small_dir, tmp_path):
    from trainer.config import load_config
    from trainer.data import DataCursor

    cfg = load_config(RECIPE, [f"data.train={small_dir}", f"run.dir={tmp_path}/run", *TINY, "train.batch_size=8"])
    cursor = DataCursor(small_dir, cfg, cpu_env())
    assert cursor.take_waits() == (0.0, 0, None)
    before = time.perf_counter()
    for _ in range(9):  # 60 samples: 7 whole batches an epoch, so this rolls over into epoch 1
        cursor.next()
    after = time.perf_counter()
    waits = cursor.take_waits()
    assert waits.images == 9 * 8
    assert 0.0 < waits.seconds <= after - before
    assert before <= waits.first_request <= after
    assert cursor.epoch == 1
    assert cursor.take_waits() == (0.0, 0, None)  # taken: counting starts anew
    cursor.next()
    again = cursor.take_waits()
    assert again.images == 8 and again.first_request > after


class FakeCursor:
    def __init__(self, *waits):
        from trainer.data import Waits

        self.queue = [Waits(*w) for w in waits]

    def take_waits(self):
        return self.queue.pop(0)


def test_step_counters_sum_every_cursor_and_time_the_first_iteration_from_its_first_request(monkeypatch):
    from trainer.reporting import Reporter

    done = []
    r = Reporter.__new__(Reporter)
    a, b = FakeCursor((0.2, 4, 100.0), (0.1, 4, 200.0)), FakeCursor((0.3, 4, 99.5), (0.05, 4, 200.1))
    r.t = SimpleNamespace(state=SimpleNamespace(step=1), datasets=lambda: [a, b])
    r.exporter = SimpleNamespace(step_done=lambda *args: done.append(args))
    r.iter_mark, r.wait_window, r.ckpt_seen, r.checkpoints = None, 0.0, 0.0, None
    now = [100.75, 101.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now.pop(0))
    r._count_step()
    r.t.state.step = 2
    r._count_step()
    monkeypatch.undo()
    (step1, seconds1, images1, wait1), (step2, seconds2, images2, wait2) = done
    assert (step1, images1, step2, images2) == (1, 8, 2, 8)
    assert seconds1 == pytest.approx(100.75 - 99.5)  # from the earliest first request of the step
    assert seconds2 == pytest.approx(101.0 - 100.75)  # then from the end of the previous step
    assert wait1 == pytest.approx(0.5) and wait2 == pytest.approx(0.15)
    assert r.wait_window == pytest.approx(0.65)


def test_checkpoint_manager_decides_when_to_save(tmp_path):
    from trainer.checkpoint import CheckpointManager

    ckpt = CheckpointManager(str(tmp_path), keep=2, every_steps=3)
    assert [s for s in range(1, 10) if ckpt.due(s)] == [3, 6, 9]
    assert not any(CheckpointManager(str(tmp_path), keep=2).due(s) for s in range(1, 10))


class TinyTrainer:
    """Just what CheckpointManager.save_run uses of a trainer."""

    def __init__(self):
        self.env, self.state, self.gathered = cpu_env(), SimpleNamespace(step=4), 0

    def gather_state(self):
        self.gathered += 1

    def state_dict(self):
        return {"step": self.state.step, "w": torch.ones(2)}


def test_save_run_saves_each_step_once_and_reports_a_failed_save_on_request(tmp_path, monkeypatch):
    from trainer import checkpoint
    from trainer.checkpoint import (
        CheckpointError,
        CheckpointManager,
        list_checkpoints,
        read_checkpoint,
    )

    saved = []
    ckpt = CheckpointManager(str(tmp_path), keep=5, every_steps=4, on_save=lambda: saved.append(1))
    t = TinyTrainer()
    ckpt.save_run(t)
    ckpt.save_run(t, blocking=True)  # the same step: only waits for it
    assert t.gathered == 1 and saved == [1] and ckpt.saved_step == 4
    assert read_checkpoint(ckpt.last_path)["step"] == 4
    resumed = CheckpointManager(str(tmp_path), keep=5, saved_step=4)
    resumed.save_run(t, blocking=True)  # the resumed step is on disk already
    assert t.gathered == 1 and [s for s, _ in list_checkpoints(str(tmp_path))] == [4]

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_checkpoint", disk_full)
    t.state.step = 8
    ckpt.save_run(t)
    deadline = time.time() + 30
    while not ckpt.failed and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(CheckpointError, match="saving the checkpoint of step 8 failed: No space left"):
        ckpt.raise_failed()
    with pytest.raises(CheckpointError, match="rank 0 could not save"):
        ckpt.raise_failed()  # the error is taken: what another rank raises
    assert ckpt.saved_step == 8 and saved == [1, 1]


def test_read_init_takes_a_run_directory_or_a_checkpoint(tmp_path):
    from trainer.checkpoint import CheckpointError, read_init, write_checkpoint

    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        os.makedirs(tmp_path / "empty" / "checkpoints")
        read_init(str(tmp_path / "empty"))
    path = write_checkpoint(str(tmp_path / "run"), 7, {"step": 7})
    assert read_init(str(tmp_path / "run")) == (path, {"step": 7})
    assert read_init(path) == (path, {"step": 7})


def test_data_marks_cover_every_dataset_of_the_trainer():
    from trainer.preemption import data_marks

    cursors = [SimpleNamespace(state_dict=lambda i=i: {"epoch": 0, "consumed": i}) for i in range(2)]
    marks = data_marks(SimpleNamespace(datasets=lambda: cursors))
    assert [(c, m["consumed"]) for c, m in marks] == [(cursors[0], 0), (cursors[1], 1)]


def test_a_run_sends_each_record_to_every_sink_as_metrics_jsonl_gets_it(digits_dir, tmp_path, monkeypatch):
    from trainer import reporting
    from trainer.config import load_config
    from trainer.run import _run
    from trainer.telemetry.prometheus import PrometheusExporter

    recorded, reported, steps = [], [], []

    class Recorder:
        def log(self, values, step):
            recorded.append({"step": step, **values})

    init = reporting.Reporter.__init__

    def with_recorder(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.records.append(Recorder())

    monkeypatch.setattr(reporting.Reporter, "__init__", with_recorder)
    monkeypatch.setattr(PrometheusExporter, "report", 
                        lambda self, values, *args, **kw: reported.append((dict(values), *args, kw)))
    monkeypatch.setattr(PrometheusExporter, "step_done", lambda self, *args: steps.append(args))
    monkeypatch.setenv("GANFORGE_METRICS_ADDR", "127.0.0.1")
    run = tmp_path / "run"
    cfg = load_config(RECIPE, [f"data.train={digits_dir}", f"run.dir={run}", *TINY, "train.max_steps=4",
                               "log.every_steps=2", "checkpoint.every_steps=2", f"log.prometheus_port={free_port()}"])
    summary = _run(cfg, cpu_env())
    written = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in written] == [2, 4]
    assert recorded == written
    assert list(recorded[0])[:1] == ["step"] and "perf/data_wait_fraction" in recorded[0]
    assert "loss/d" in recorded[0] and "train/nonfinite_steps" in recorded[0]
    # Prometheus: the training values of each log step, with the running totals and the data state
    assert len(reported) == 2
    values, nonfinite, device, epoch, kw = reported[1]
    assert values["loss/d"] == written[1]["loss/d"] and nonfinite == 0 and epoch == 0
    assert device == torch.device("cpu") and kw == {"skipped_samples": 0}
    assert "perf/images_per_s" not in values and "lr/g" in values
    # every step: its images (this rank's share of the batch), time and data wait
    assert [s[0] for s in steps] == [1, 2, 3, 4] and all(s[2] == 16 for s in steps)
    assert all(s[1] is not None and 0 < s[3] <= s[1] for s in steps)
    assert summary["step"] == 4 and sorted(os.listdir(run / "checkpoints")) == ["step_00000002", "step_00000004"]
