"""Read one epoch of remote shards in one rank of a torchrun job and save what it read.

Used by tests/test_remote_jobs.py and bench/remote.py:
`torchrun ... tests/remote_probe.py URL CACHE_DIR OUT_DIR [key=value ...]` (StreamSpec fields).
Each rank writes OUT_DIR/rank<r>.json: its global positions, its remote-read counters and peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from data_pipeline.loader import FETCH_FIELDS, ShardStream, StreamSpec, make_loader  # noqa: E402


def main() -> None:
    url, cache_dir, out = sys.argv[1:4]
    fields = dict(a.split("=", 1) for a in sys.argv[4:])
    workers = int(fields.pop("workers", "2"))
    spec = StreamSpec(seed=int(fields.pop("seed", "0")), rank=int(os.environ["RANK"]),
                      world_size=int(os.environ["WORLD_SIZE"]), ranks_per_node=int(os.environ["LOCAL_WORLD_SIZE"]),
                      cache_dir=cache_dir, drop_last=False, **{k: int(v) for k, v in fields.items()})
    stream = ShardStream(url, spec)
    t0 = time.perf_counter()
    positions, fetched, images = [], torch.zeros(len(FETCH_FIELDS), dtype=torch.float64), 0
    for batch in make_loader(stream, num_workers=workers):
        positions += batch["position"].tolist()
        fetched += batch["fetch"]
        images += len(batch["position"])
    seconds = time.perf_counter() - t0
    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    with open(os.path.join(out, f"rank{spec.rank}.json"), "w") as f:
        json.dump({"rank": spec.rank, "positions": positions, "seconds": seconds, "images": images,
                   "peak_rss_bytes": peak_kib * 1024, **dict(zip(FETCH_FIELDS, fetched.tolist(), strict=True))}, f)


if __name__ == "__main__":
    main()
