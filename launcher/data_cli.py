"""`ganforge data ...`: make-shards, verify, inspect, plan."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from data_pipeline import DataError, load_index
from data_pipeline.planner import epoch_order, plan_epoch, rank_slots
from data_pipeline.progress import bar, silent

MAX_LABEL_LINES = 50  # more classes than this (Stacked MNIST has 1,000) are summarised in one line


def add_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="write, check, inspect and plan shard datasets")
    dsub = data.add_subparsers(dest="data_cmd", required=True)

    p = dsub.add_parser("make-shards", help="write WebDataset tar shards and index.json")
    p.add_argument("--source", required=True, choices=["mnist", "digits", "stacked_mnist", "folder", "paired", "patches", "gaussians"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--input", help="input folder (folder, paired, patches)")
    p.add_argument("--size", type=int, help="image side in pixels (default 32 for digits/mnist/stacked_mnist, 64 folder, "
                                            "256 paired, 480 patches)")
    p.add_argument("--step", type=int, default=None, help="patches: pixels between patch corners (default size / 2)")
    p.add_argument("--format", choices=["png", "jpg"], default="png", help="image encoding in the shards")
    p.add_argument("--samples-per-shard", type=int, default=None, help="samples per tar (default 256; 10000 for gaussians)")
    p.add_argument("--mixture", choices=["grid25", "ring8"], default="grid25")
    p.add_argument("--n", type=int, default=None,
                   help="samples to draw (gaussians: points, default 100000; stacked_mnist: images, default 25600)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw (gaussians, stacked_mnist)")
    p.add_argument("--force", action="store_true", help="replace a dataset already in --out")
    p.set_defaults(func=make_shards)

    p = dsub.add_parser("verify", help="check every shard against the index")
    p.add_argument("dir")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=verify)

    p = dsub.add_parser("inspect", help="counts, sizes, labels and a preview grid")
    p.add_argument("dir")
    p.add_argument("--grid", help="write a preview grid PNG here")
    p.add_argument("--n", type=int, default=64, help="samples in the grid")
    p.set_defaults(func=inspect)

    p = dsub.add_parser("plan", help="print the read plan: one JSON object per line, in consumption order")
    p.add_argument("dir")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="samples of the epoch already consumed")
    p.add_argument("--no-pad", action="store_true", help="drop the tail instead of padding ranks to equal counts")
    p.add_argument("--shuffle-block-shards", type=int, default=0)
    p.add_argument("--partition-nodes", type=int, default=0, help="data.partition_nodes: node streams of the order")
    p.add_argument("--ranks-per-node", type=int, default=0,
                   help="ranks of one node (with --partition-nodes: a node's ranks read its own streams)")
    p.set_defaults(func=plan)


def make_shards(args: argparse.Namespace) -> int:
    from data_pipeline import sources
    from data_pipeline.writer import write_shards

    if args.source in ("folder", "paired", "patches") and not args.input:
        raise DataError(f"--source {args.source} needs --input PATH")
    default_size = {"folder": 64, "paired": 256, "patches": 480}.get(args.source, 32)
    size = args.size or default_size
    if size < 8:
        raise DataError(f"--size must be at least 8, got {size}")
    if args.source == "mnist":
        src = sources.mnist_source(size, args.format)
    elif args.source == "digits":
        src = sources.digits_source(size, args.format)
    elif args.source == "stacked_mnist":
        src = sources.stacked_mnist_source(size, 25_600 if args.n is None else args.n, args.seed, args.format)
    elif args.source == "folder":
        src = sources.folder_source(args.input, size, args.format)
    elif args.source == "paired":
        src = sources.paired_source(args.input, size, args.format)
    elif args.source == "patches":
        src = sources.patches_source(args.input, size, size // 2 if args.step is None else args.step, args.format)
    else:
        src = sources.gaussians_source(args.mixture, 100_000 if args.n is None else args.n, args.seed)
    per_shard = args.samples_per_shard or (10_000 if args.source == "gaussians" else 256)
    index = write_shards(src.samples, args.out, kind=src.kind, meta=src.meta, samples_per_shard=per_shard,
                         force=args.force, progress=bar, total=src.count)
    print(f"{args.out}: {index.num_samples} samples in {len(index.shards)} shards "
          f"({sum(s.bytes for s in index.shards) / 1e6:.1f} MB), index {args.out}/index.json")
    return 0


def verify(args: argparse.Namespace) -> int:
    from data_pipeline.verify import verify_index

    index = load_index(args.dir)
    problems = verify_index(index, progress=silent if args.quiet else bar)
    for p in problems:
        print(f"BAD {p}", file=sys.stderr)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"{args.dir}: {len(index.shards)} shards, {index.num_samples} samples: all match the index")
    return 0


def inspect(args: argparse.Namespace) -> int:
    index = load_index(args.dir)
    sizes = [s.bytes for s in index.shards]
    print(f"dataset:  {args.dir}  (kind {index.kind}, fingerprint {index.fingerprint()})")
    print(f"samples:  {index.num_samples} in {len(index.shards)} shards "
          f"({min(sizes) / 1e6:.2f}-{max(sizes) / 1e6:.2f} MB each, {sum(sizes) / 1e6:.1f} MB total)")
    for k, v in index.meta.items():
        if k not in ("centres",):
            print(f"{k + ':':<9} {_brief(v)}")
    from data_pipeline.index import parse_label
    from data_pipeline.loader import ShardReader

    reader = ShardReader(index)
    try:
        labels = Counter()
        for i in range(index.num_samples):
            if "cls" in index.locate(i)[1].members:
                shard, key, members = reader.read(i)
                try:
                    labels[parse_label(members["cls"], index.meta.get("label_names"))] += 1
                except DataError as e:
                    raise DataError(f"{shard.name}: key {key}: {e}") from None
        names = index.meta.get("label_names") or []
        if len(labels) > MAX_LABEL_LINES:
            counts = sorted(labels.values())
            print(f"labels:   {len(labels)}{f' of {len(names)}' if names else ''} present, "
                  f"{counts[0]}-{counts[-1]} samples each (median {counts[len(counts) // 2]})")
        elif labels:
            print("labels:")
            for lab, count in sorted(labels.items()):
                name = names[lab] if lab < len(names) else str(lab)
                print(f"  {name:>12}: {count:6d} {'#' * max(1, round(40 * count / max(labels.values())))}")
        if args.grid:
            import torch

            from trainer.sampling import save_grid

            n = min(args.n, index.num_samples)
            items = [reader.decode(i) for i in range(n)]
            if index.kind == "points":
                raise DataError("--grid shows images; this dataset holds 2-D points")
            key = "image" if index.kind == "image" else "a"
            imgs = torch.stack([it[key] for it in items]).float() / 127.5 - 1
            if index.kind == "paired":
                imgs = torch.cat([imgs, torch.stack([it["b"] for it in items]).float() / 127.5 - 1])
            print(f"grid:     {save_grid(imgs, args.grid)}")
    finally:
        reader.close()
    return 0


def _brief(value: object) -> str:
    """A meta value for one line: long lists (1,000 label names) shortened to their ends."""
    if isinstance(value, list) and len(value) > 8:
        return f"{len(value)} items [{', '.join(map(repr, value[:3]))}, ..., {value[-1]!r}]"
    return str(value)


def plan(args: argparse.Namespace) -> int:
    index = load_index(args.dir)
    if args.world_size < 1:
        raise DataError(f"--world-size must be >= 1, got {args.world_size}")
    if not 0 <= args.start <= index.num_samples:
        raise DataError(f"--start must be in 0..{index.num_samples}, got {args.start}")
    for flag in ("shuffle_block_shards", "partition_nodes", "ranks_per_node"):
        if getattr(args, flag) < 0:
            raise DataError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    groups = max(1, args.partition_nodes)
    order = epoch_order([s.num_samples for s in index.shards], args.seed, args.epoch, args.shuffle_block_shards, groups)
    slots = rank_slots(args.world_size, groups, args.ranks_per_node, args.start)
    keys = index.keys()
    out = sys.stdout
    for e in plan_epoch(order, args.world_size, args.start, pad=not args.no_pad, slots=slots):
        out.write(json.dumps({"rank": e.rank, "index": e.index, "global": e.global_pos, "key": keys[e.sample]}) + "\n")
    return 0
