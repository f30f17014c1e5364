"""Seams of `ganforge upscale --tile`: tiled against whole-image upscaling of an esrgan run.

Usage (from the folder the run was trained in, where its data.val resolves):
    python bench/tiling.py --run RUN [--tile 32] [--contexts 4 8 16 24 32] [--n 8]
Upscales the first --n held-out HR images of the run (data.val, 128x128 for esrgan_cpu) whole and
in tiles of --tile LR pixels with each context, as 8-bit images the way `upscale` writes them,
and counts the values that differ. Last stdout line: JSON {context: {max, fraction_differing}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from trainer.data import to_unit_range
    from trainer.families.esrgan import load_upscaler
    from trainer.families.image_to_image import first_images
    from trainer.sampling import eight_bit
    from trainer.tiling import upscale_tiled

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True)
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--contexts", type=int, nargs="*", default=[4, 8, 16, 24, 32])
    p.add_argument("--n", type=int, default=8)
    args = p.parse_args()
    net, cfg, path = load_upscaler(args.run)
    x = to_unit_range(first_images(cfg.data.val, args.n)["image"])  # the HR images themselves, as inputs
    whole = eight_bit(upscale_tiled(net, x, cfg.model.scale)).int()
    result = {}
    for context in args.contexts:
        diff = (eight_bit(upscale_tiled(net, x, cfg.model.scale, args.tile, context)).int() - whole).abs()
        result[context] = {"max": int(diff.max()), "fraction_differing": float((diff > 0).double().mean())}
        print(f"context {context:>3}: max {result[context]['max']}, "
              f"{result[context]['fraction_differing']:.3g} of {diff.numel()} values differ", flush=True)
    print(json.dumps({"checkpoint": path, "tile": args.tile, "inputs": list(x.shape), "contexts": result}))


if __name__ == "__main__":
    main()
