"""Image files in and out of the image-to-image commands (`translate`, `upscale`).

One reader and one writer, so every command names, refuses and rounds the same way: inputs are
an image file or a folder searched recursively; outputs keep the inputs' relative paths under
`--out`, which may not be the input folder; pixels go to 8 bits as sample grids and FID do
(`trainer.sampling.eight_bit`).
"""

from __future__ import annotations

import os

import torch

from data_pipeline import DataError
from data_pipeline.sources import IMAGE_EXTS
from trainer.data import to_unit_range
from trainer.sampling import eight_bit


def input_images(source: str, out_dir: str) -> tuple[str, list[str]]:
    """(folder, image paths relative to it) for an image file or a folder searched recursively;
    refuses an `out_dir` that is that folder, so no input is overwritten."""
    if os.path.isdir(source):
        files = sorted(os.path.relpath(os.path.join(d, f), source) for d, _, names in os.walk(source)
                       for f in names if os.path.splitext(f)[1].lower() in IMAGE_EXTS)
        root = source
    elif os.path.isfile(source):
        files, root = [os.path.basename(source)], os.path.dirname(os.path.abspath(source))
    else:
        raise DataError(f"{source}: no such file or folder")
    if not files:
        raise DataError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))})")
    if os.path.abspath(out_dir) == os.path.abspath(root):
        raise DataError(f"{out_dir}: is the input folder; choose another --out so no input is overwritten")
    return root, files


def open_image(path: str, channels: int):
    """A PIL image with `channels` channels (1: grey, 3: RGB); a DataError naming the file when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path).convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def as_input(image) -> torch.Tensor:
    """A PIL image as a (1, C, H, W) tensor in [-1, 1], in the default dtype."""
    import numpy as np

    pixels = torch.from_numpy(np.asarray(image).copy())
    return to_unit_range(pixels.reshape(*pixels.shape[:2], -1).permute(2, 0, 1)[None])


def save_output(image: torch.Tensor, out_dir: str, name: str, size: tuple[int, int] | None = None) -> str:
    """One (C, H, W) image in [-1, 1] written as 8 bits to out_dir/name (its folders made), resized
    to `size` (width, height) with bicubic filtering if given; returns the path."""
    from PIL import Image

    arr = eight_bit(image).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    if size is not None and img.size != size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    path = os.path.join(out_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)
    return path
