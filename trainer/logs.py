"""Logging for every ganforge process: timestamps and levels, one line per record, on standard error.

Rank 0 shows ganforge's INFO lines and up; other ranks only warnings and errors, prefixed with
their rank. `GANFORGE_LOG_LEVEL` (DEBUG, INFO, WARNING, ERROR) changes the level of ganforge's
own loggers on rank 0. Third-party libraries (MLflow, alembic, urllib3, botocore, DeepSpeed,
torch.distributed) show warnings and errors only.
"""

from __future__ import annotations

import logging
import os
import sys

OWN = ("trainer", "launcher", "data_pipeline")  # ganforge's packages, each logging under its module name
QUIET = ("mlflow", "alembic", "urllib3", "botocore", "boto3", "s3transfer", "DeepSpeed", "deepspeed",
         "torch.distributed", "matplotlib", "PIL", "git")
DATE = "%Y-%m-%d %H:%M:%S"


class _Source(logging.Filter):
    """Names a record's source: `ganforge` for our own packages, the logger's name otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.source = "ganforge" if record.name.split(".")[0] in OWN else record.name
        return True


def setup(rank: int | None = None) -> None:
    """Configure logging once per process (idempotent); `rank` defaults to $RANK, else 0."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    level = logging.getLevelName(os.environ.get("GANFORGE_LOG_LEVEL", "INFO").upper())
    if not isinstance(level, int):  # an unknown name comes back as the string "Level X"
        level = logging.INFO
    if rank != 0:
        level = max(level, logging.WARNING)
    where = f"[rank {rank}] " if rank != 0 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Source())
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {where}%(source)s: %(message)s", DATE))
    handler.set_name("ganforge")
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != "ganforge"] + [handler]
    root.setLevel(logging.WARNING)
    for name in OWN:
        logging.getLogger(name).setLevel(level)
    # MLflow installs its own INFO handler when imported; it reads this variable then.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    for name in QUIET:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.WARNING))
