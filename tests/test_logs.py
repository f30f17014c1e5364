"""Logs and progress: levels, timestamps and rank prefixes; progress bars on a terminal, lines elsewhere."""

from __future__ import annotations

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios

from tests.conftest import BIN, REPO, run_cli

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


def test_progress_off_a_terminal_logs_a_line_per_tenth_at_most_and_one_at_the_end(caplog, monkeypatch):
    from data_pipeline import progress

    caplog.set_level(logging.INFO, logger="data_pipeline")
    assert not sys.stderr.isatty()  # pytest captures it: the line-based form
    with progress.bar(100, "work", "items") as advance:
        for _ in range(100):
            advance(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("work: 100/100 items (100%)"), lines  # fast: only the last

    caplog.clear()
    monkeypatch.setattr(progress._Lines, "MIN_GAP", 0.0)  # no minimum gap: one line per tenth
    with progress.bar(100, "work", "items") as advance:
        for _ in range(50):
            advance(2)
    lines = [r.getMessage() for r in caplog.records]
    assert [int(re.match(r"work: (\d+)/100", line).group(1)) for line in lines] == [10, 20, 30, 40, 50, 60, 70, 80,
                                                                                    90, 100]
    assert all("ETA" in line for line in lines)


def test_make_shards_draws_a_bar_on_a_terminal_and_logs_lines_otherwise(tmp_path):
    main, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    cmd = [os.path.join(BIN, "ganforge"), "data", "make-shards", "--source", "digits", "--out", str(tmp_path / "a")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=follower, cwd=REPO)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(main)
    assert proc.wait(timeout=120) == 0
    shown = seen.decode(errors="replace")
    assert "make-shards: 100%" in shown and "1797/1797" in shown and "\r" in shown, shown[-500:]
    assert " INFO " not in shown  # the bar replaces the log lines

    r = run_cli("data", "make-shards", "--source", "digits", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and all(re.match(rf"{STAMP} INFO ganforge: make-shards: \d+/1797 samples", x) for x in lines), lines
    assert lines[-1].split(": ", 1)[1].startswith("make-shards: 1797/1797 samples (100%)")
    assert "\r" not in r.stderr
    assert r.stdout.strip().endswith("index " + str(tmp_path / "b") + "/index.json")  # the result stays on stdout


LOGGING_PROBE = """
import logging, sys
from trainer.logs import setup
setup(rank=int(sys.argv[1]))
import mlflow  # installs its own handler at import; ganforge keeps it quiet
logging.getLogger("trainer.run").info("ours at info")
logging.getLogger("trainer.run").warning("ours at warning")
logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
logging.getLogger("urllib3.connectionpool").info("Starting new HTTP connection")
logging.getLogger("urllib3.connectionpool").warning("Retrying")
"""


def test_rank_zero_logs_info_with_timestamps_other_ranks_only_warnings_with_their_rank():
    def lines(rank: int) -> list[str]:
        r = subprocess.run([sys.executable, "-c", LOGGING_PROBE, str(rank)], capture_output=True, text=True,
                           cwd=REPO, env={k: v for k, v in os.environ.items() if k != "MLFLOW_LOGGING_LEVEL"},
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert not r.stdout
        return r.stderr.strip().splitlines()

    zero = lines(0)
    assert len(zero) == 3, zero
    assert re.fullmatch(rf"{STAMP} INFO ganforge: ours at info", zero[0])
    assert re.fullmatch(rf"{STAMP} WARNING ganforge: ours at warning", zero[1])
    assert re.fullmatch(rf"{STAMP} WARNING urllib3.connectionpool: Retrying", zero[2])
    one = lines(1)
    assert len(one) == 2, one
    assert re.fullmatch(rf"{STAMP} WARNING \[rank 1\] ganforge: ours at warning", one[0])
    assert re.fullmatch(rf"{STAMP} WARNING \[rank 1\] urllib3.connectionpool: Retrying", one[1])


def test_the_training_line_names_losses_and_logits_and_shows_kimg_and_eta(digits_dir, tmp_path):
    r = run_cli("train", "--config", "configs/dcgan_digits.yaml", f"data.train={digits_dir}",
                f"run.dir={tmp_path / 'run'}", "train.max_steps=10", "log.every_steps=5", "train.batch_size=32",
                "model.g_width=8", "model.d_width=8", f"log.mlflow_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                env={"WORLD_SIZE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    steps = [line for line in r.stderr.splitlines() if "ganforge: step " in line]
    assert len(steps) == 2, r.stderr
    number = r"-?\d+\.\d{3}"
    line = re.compile(rf"{STAMP} INFO ganforge: step (\d+)/10  loss_d={number}  D\(real\)={number}  "
                      rf"D\(fake\)={number}  loss_g={number}  \d+ img/s  ([\d.]+) kimg  epoch 0  ETA \d+:\d\d")
    found = [line.fullmatch(s) for s in steps]
    assert all(found), steps
    assert [(int(m.group(1)), float(m.group(2))) for m in found] == [(5, 0.2), (10, 0.3)]  # 32 images a step
    assert "mlflow" not in r.stderr.lower(), r.stderr  # MLflow's own INFO lines are quiet
    assert "done at step 10" in r.stdout  # the summary is the command's result, on stdout
    r = run_cli("sample", "--run", str(tmp_path / "run"), "--n", "300", "--seed", "0", "--out", str(tmp_path / "x.npy"))
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"{STAMP} INFO ganforge: sample: 300/300 images \(100%\), .*", r.stderr.strip()), r.stderr
