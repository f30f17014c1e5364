"""Remote shards at scale: one epoch from a local HTTP server with per-request latency, read by N nodes.

Builds a dataset of --n 64x64 JPEGs in --shards shards (cached under --workdir), serves it from
bench/shard_server.py (Python's http.server with range requests) on 127.0.0.1 with
--latency-ms before every response, and reads one epoch with --nodes torchrun agents (each its
own node cache, like separate machines) x --ranks ranks x --workers loader workers:

- ganforge: tests/remote_probe.py, the node cache with data.partition_nodes=--nodes,
  data.shuffle_block_shards=--block-shards and data.prefetch_shards=--prefetch;
- webdataset: the same URLs read by plain webdataset (split_by_node, split_by_worker, shards
  streamed once each, in order) with the same decoder (torchvision's decode_image).

The server counts the requests and body bytes. img/s is the epoch's images over the slowest
rank's reading time (process start-up excluded for both). The two readers alternate for
--repeats epochs each (a fresh server and fresh caches every time). Last stdout line: JSON with
fetched_ratio (bytes sent / dataset bytes, the largest of the repeats), requests, peak_rss_mb
(largest process, a main process or a loader worker), img_s (median) with img_s_spread
(min, max), the same for webdataset, and ratio = the median of the repeats' ganforge /
webdataset img/s with ratio_spread.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def make_dataset(workdir: str, n: int, shards: int) -> str:
    """n 64x64 JPEGs (bench/loader.py's generator) written as `shards` shards; reused when present."""
    from bench.loader import make_images
    from data_pipeline import load_index
    from data_pipeline.sources import folder_source
    from data_pipeline.writer import write_shards

    images, out = os.path.join(workdir, f"images-{n}"), os.path.join(workdir, f"shards-{n}-{shards}")
    if os.path.exists(os.path.join(out, "index.json")) and load_index(out).num_samples == n:
        return out
    make_images(images, n, 64)
    src = folder_source(images, size=64, fmt="jpg")
    write_shards(src.samples, out, kind=src.kind, meta=src.meta, samples_per_shard=-(-n // shards), force=True)
    return out


def webdataset_rank(url: str, out: str, workers: int, batch: int) -> None:
    """One rank of the webdataset reading: its share of the shards, each streamed once."""
    import torch
    import webdataset as wds
    from torchvision.io import ImageReadMode, decode_image

    from data_pipeline import load_index

    def torchvision_rgb(key: str, data: bytes):
        if not key.endswith("jpg"):
            return None
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    urls = [f"{url}/{s.name}" for s in load_index(url).shards]
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker)
          .decode(torchvision_rgb).to_tuple("jpg").batched(batch, partial=True))
    t0, images = time.perf_counter(), 0
    for (b,) in wds.WebLoader(ds, batch_size=None, num_workers=workers):
        images += len(b)
    report(out, int(os.environ["RANK"]), images, time.perf_counter() - t0)


def report(out: str, rank: int, images: int, seconds: float) -> None:
    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "images": images, "seconds": seconds, "peak_rss_bytes": peak_kib * 1024}, f)


def run_nodes(args, script: list[str], out: str) -> list[dict]:
    """`--nodes` torchrun agents of `--ranks` processes each on this machine; every rank's report."""
    from tests.conftest import free_port

    port = free_port()
    procs = []
    for node in range(args.nodes):
        cmd = [os.path.join(BIN, "torchrun"), "--nnodes", str(args.nodes), "--node-rank", str(node),
               "--nproc-per-node", str(args.ranks), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", f"bench-{port}", *[a.replace("{node}", str(node)) for a in script]]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a node failed:\n" + "\n".join(log[-3000:] for log in logs))
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(args.nodes * args.ranks)]


def summarise(name: str, ranks: list[dict], server, dataset_bytes: int, expected: int) -> dict:
    images = sum(r["images"] for r in ranks)
    if images < expected:
        sys.exit(f"{name} read {images} images, expected at least {expected}")
    return {"fetched_ratio": round(server.total_bytes() / dataset_bytes, 4), "requests": server.total_requests(),
            "peak_rss_mb": round(max(r["peak_rss_bytes"] for r in ranks) / 2**20, 1),
            "img_s": round(images / max(r["seconds"] for r in ranks), 1)}


def read_epoch(name: str, args: argparse.Namespace, shards: str, dataset_bytes: int) -> dict:
    """One epoch read by `name` from a fresh server (and fresh node caches)."""
    from bench.shard_server import ShardServer

    server = ShardServer(shards, latency_ms=args.latency_ms)
    scratch = tempfile.mkdtemp(prefix=f"bench-remote-{name}-")
    try:
        if name == "ganforge":
            script = ["tests/remote_probe.py", server.url, os.path.join(scratch, "cache{node}"), scratch,
                      f"workers={args.workers}", f"batch_size={args.batch}", f"block_shards={args.block_shards}",
                      f"groups={args.nodes if args.partition_nodes < 0 else max(1, args.partition_nodes)}",
                      f"prefetch_shards={args.prefetch}"]
        else:
            script = ["bench/remote.py", "--workers", str(args.workers), "--batch", str(args.batch),
                      "--webdataset-rank", server.url, scratch]
        return summarise(name, run_nodes(args, script, scratch), server, dataset_bytes, args.n)
    finally:
        server.close()
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000, help="images")
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2, help="processes per node")
    p.add_argument("--workers", type=int, default=2, help="loader workers per rank")
    p.add_argument("--latency-ms", type=float, default=50.0, help="injected before every response")
    p.add_argument("--batch", type=int, default=64, help="per rank")
    p.add_argument("--block-shards", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=4)
    p.add_argument("--partition-nodes", type=int, default=-1, help="data.partition_nodes (default: --nodes)")
    p.add_argument("--repeats", type=int, default=3, help="alternating epochs per reader")
    p.add_argument("--workdir", default=os.path.join("runs", "bench-remote"))
    p.add_argument("--webdataset-rank", nargs=2, metavar=("URL", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.webdataset_rank:
        webdataset_rank(*args.webdataset_rank, args.workers, args.batch)
        return
    from data_pipeline import load_index

    print(f"preparing {args.n} JPEGs in {args.shards} shards under {args.workdir} ...", flush=True)
    shards = make_dataset(args.workdir, args.n, args.shards)
    index = load_index(shards)
    dataset_bytes = sum(s.bytes for s in index.shards)
    result: dict = {"images": args.n, "shards": args.shards, "dataset_mb": round(dataset_bytes / 2**20, 1),
                    "nodes": args.nodes, "ranks": args.ranks, "workers": args.workers, "latency_ms": args.latency_ms,
                    "block_shards": args.block_shards, "partition_nodes": args.nodes if args.partition_nodes < 0 else args.partition_nodes}
    runs: dict[str, list[dict]] = {"ganforge": [], "webdataset": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(read_epoch(name, args, shards, dataset_bytes))
            print(f"{name:>10}: {runs[name][-1]}", flush=True)
    for name, rs in runs.items():
        rates = sorted(r["img_s"] for r in rs)
        result[name] = {"fetched_ratio": max(r["fetched_ratio"] for r in rs),
                        "requests": max(r["requests"] for r in rs),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                        "img_s": statistics.median(rates), "img_s_spread": [rates[0], rates[-1]]}
    result |= result.pop("ganforge")
    ratios = sorted(g["img_s"] / w["img_s"] for g, w in zip(runs["ganforge"], runs["webdataset"], strict=True))
    result["ratio"] = round(statistics.median(ratios), 3)
    result["ratio_spread"] = [round(ratios[0], 3), round(ratios[-1], 3)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
