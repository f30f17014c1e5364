"""`ganforge export`: a run's generator as one file that plain PyTorch or onnxruntime can run."""

from __future__ import annotations

import argparse

FORMATS = "safetensors|torchscript|onnx|exported"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=f"write a run's generator as {FORMATS}, checked after writing")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--format", required=True, metavar=FORMATS,
                   help="safetensors (weights + config), torchscript, onnx, or exported (torch.export .pt2)")
    p.add_argument("--out", required=True, help="file to write (an existing one is kept unless --force)")
    p.add_argument("--checkpoint", help="a checkpoint file (default: the newest valid one of --run)")
    p.add_argument("--no-ema", action="store_true", help="export the raw generator instead of its EMA")
    p.add_argument("--direction", choices=["AtoB", "BtoA"],
                   help="cyclegan: export G_AB or G_BA alone (default: both, as (a, b) -> (fake_b, fake_a))")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=export)


def export(args: argparse.Namespace) -> int:
    from trainer.export import CHECK_ROWS, export_generator

    diff = export_generator(args.run, args.format, args.out, args.checkpoint, use_ema=not args.no_ema,
                            direction=args.direction, force=args.force)
    print(f"{args.out}: {args.format}, reloaded and matched the generator on {CHECK_ROWS} inputs "
          f"(max |difference| {diff:.2g})")
    return 0
