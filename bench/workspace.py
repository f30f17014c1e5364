"""A throw-away workspace for benchmarks: sklearn's digits as shards and a config pointing at them."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def digits_workspace(config: str, name: str, *overrides: str):
    """(config, data dir) for `config` trained on freshly written digits shards in a temp dir (removed
    when this process exits)."""
    from data_pipeline.sources import digits_source
    from data_pipeline.writer import write_shards
    from trainer.families import load_config

    work = tempfile.mkdtemp(prefix=f"ganforge-bench-{name}-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # removed when the benchmark's process exits
    data = os.path.join(work, "data")
    src = digits_source(32)
    write_shards(src.samples, data, kind=src.kind, meta=src.meta)
    cfg = load_config(config, [f"data.train={data}", f"run.dir={work}/runs/{name}", *overrides])
    return cfg, data
