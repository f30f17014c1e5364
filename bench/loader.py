"""Loader throughput: ganforge's deterministic loader vs webdataset (same decoder, and its default) vs ImageFolder.

Generates N 64x64 JPEGs (once, cached under --workdir), writes them as shards with
`ganforge data make-shards --source folder --format jpg`, then reads every image once
through each pipeline with the same workers and batch size, after one warm-up pass that
fills the page cache, in `--repeats` alternating passes. All decode to uint8 CHW tensors and
collate batches. `webdataset_same_decoder` decodes with torchvision's decode_image as
ganforge's loader does, so the loaders alone are compared (goal: ratio_same_decoder >= 1.0);
`webdataset` uses its default PIL decoding, what users get.

Last stdout line: JSON with images/s of each (median, spread) and the ratios ganforge / other
(median of the per-pass ratios, with their spread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_images(root: str, n: int, size: int) -> None:
    from PIL import Image

    marker = os.path.join(root, f".done-{n}-{size}")
    if os.path.exists(marker):
        return
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size * 4, size * 4, 3), dtype=np.uint8)
    for i in range(n):
        cls = os.path.join(root, f"class{i % 10}")
        os.makedirs(cls, exist_ok=True)
        y, x = rng.integers(0, size * 3, 2)
        tile = np.roll(base[y:y + size, x:x + size], i % size, axis=1)  # varied, JPEG-compressible content
        Image.fromarray(tile).save(os.path.join(cls, f"{i:06d}.jpg"), quality=90)
    open(marker, "w").close()


def count_images(root: str) -> int:
    return sum(1 for _, _, files in os.walk(root) for f in files if f.endswith(".jpg"))


def make_shards(images: str, out: str) -> None:
    from data_pipeline import load_index
    from data_pipeline.sources import folder_source
    from data_pipeline.writer import write_shards

    if os.path.exists(os.path.join(out, "index.json")) and load_index(out).num_samples == count_images(images):
        return  # the shards of exactly these images, from an earlier run
    src = folder_source(images, size=64, fmt="jpg")
    write_shards(src.samples, out, kind=src.kind, meta=src.meta, samples_per_shard=1000, force=True)


def time_pipeline(batches) -> tuple[int, float]:
    t0, n = time.perf_counter(), 0
    for batch in batches:
        n += len(batch)
    return n, time.perf_counter() - t0


def ganforge_pipeline(shards: str, workers: int, batch: int):
    from data_pipeline.loader import ShardStream, StreamSpec, make_loader

    stream = ShardStream(shards, StreamSpec(seed=0, batch_size=batch, drop_last=False))
    return (b["image"] for b in make_loader(stream, num_workers=workers))


def webdataset_pipeline(shards: str, workers: int, batch: int, same_decoder: bool = False):
    """webdataset over the same shards: its default PIL decoding ("torchrgb8", what users get),
    or (same_decoder) torchvision's decode_image, the decoder ganforge's loader uses."""
    import webdataset as wds

    def torchvision_rgb(key: str, data: bytes):
        if not key.endswith("jpg"):
            return None
        import torch
        from torchvision.io import ImageReadMode, decode_image

        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    urls = sorted(os.path.join(shards, n) for n in os.listdir(shards) if n.endswith(".tar"))
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker)
          .decode(torchvision_rgb if same_decoder else "torchrgb8").to_tuple("jpg").batched(batch, partial=True))
    return (b[0] for b in wds.WebLoader(ds, batch_size=None, num_workers=workers))


def imagefolder_pipeline(images: str, workers: int, batch: int):
    import torch
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(images, transform=transforms.PILToTensor())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=False)
    return (b[0] for b in loader)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="alternating timed passes of each pipeline")
    p.add_argument("--workdir", default=os.path.join("runs", "bench-loader"))
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    images, shards = os.path.join(args.workdir, "images"), os.path.join(args.workdir, "shards")
    print(f"preparing {args.n} JPEGs and shards in {args.workdir} ...", flush=True)
    make_images(images, args.n, 64)
    make_shards(images, shards)
    pipelines = {
        "ganforge": lambda: ganforge_pipeline(shards, args.workers, args.batch),
        "webdataset_same_decoder": lambda: webdataset_pipeline(shards, args.workers, args.batch, same_decoder=True),
        "webdataset": lambda: webdataset_pipeline(shards, args.workers, args.batch),
        "imagefolder": lambda: imagefolder_pipeline(images, args.workers, args.batch),
    }
    for make in pipelines.values():  # warm the page cache
        time_pipeline(make())
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.repeats):  # alternating, so drifts in machine speed touch every pipeline alike
        for name, make in pipelines.items():
            n, secs = time_pipeline(make())
            assert n == args.n, f"{name} read {n} images, expected {args.n}"
            rates[name].append(n / secs)
    result: dict = {"images": args.n, "workers": args.workers, "batch": args.batch, "repeats": args.repeats}
    for name, rs in rates.items():
        result[f"{name}_img_s"] = round(statistics.median(rs), 1)
        result[f"{name}_spread"] = [round(min(rs), 1), round(max(rs), 1)]
        print(f"{name:>24}: {statistics.median(rs):8.0f} images/s (median of {len(rs)}; {min(rs):.0f}..{max(rs):.0f})",
              flush=True)
    for key, other in (("ratio_same_decoder", "webdataset_same_decoder"), ("ratio_vs_webdataset", "webdataset"),
                       ("ratio_vs_imagefolder", "imagefolder")):
        ratios = [a / b for a, b in zip(rates["ganforge"], rates[other], strict=True)]
        result[key] = round(statistics.median(ratios), 3)
        result[f"{key}_spread"] = [round(min(ratios), 3), round(max(ratios), 3)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
