"""FID between two folders of image files (e.g. a dataset's images and `ganforge sample`'s PNGs),
read as 8-bit images and passed to Inception the way `evaluate` passes real images."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from data_pipeline.sources import IMAGE_EXTS
from trainer.evaluation.errors import EvaluationError
from trainer.evaluation.features import extract
from trainer.evaluation.fid import fid
from trainer.evaluation.real_data import from_eight_bit
from trainer.image_files import open_image


def image_paths(folder: str) -> list[str]:
    """The image files under `folder` (searched recursively), in sorted order."""
    if not os.path.isdir(folder):
        raise EvaluationError(f"{folder}: no such folder")
    paths = sorted(os.path.join(d, f) for d, _, names in os.walk(folder) for f in names
                   if os.path.splitext(f)[1].lower() in IMAGE_EXTS)
    if len(paths) < 2:
        raise EvaluationError(f"{folder}: FID needs at least 2 images, found {len(paths)} "
                              f"(looked for {', '.join(sorted(IMAGE_EXTS))})")
    return paths


def folder_features(folder: str, extractor: nn.Module, device: torch.device | str = "cpu",
                    chunk: int = 250) -> torch.Tensor:
    """Features (float64, CPU) of every image in `folder`, read as RGB bytes and then as real
    images are (`from_eight_bit`); all images must have one size, as they are batched."""
    paths, parts, size = image_paths(folder), [], None
    for i in range(0, len(paths), chunk):
        pixels = []
        for path in paths[i:i + chunk]:
            image = open_image(path, 3)  # grey is repeated to 3 channels, as Inception does anyway
            size = size or image.size
            if image.size != size:
                raise EvaluationError(f"{path}: {image.size[0]}x{image.size[1]} pixels, but {paths[0]} "
                                      f"has {size[0]}x{size[1]}; the images of a folder must have one size")
            pixels.append(np.asarray(image))
        batch = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
        parts.append(extract(extractor, from_eight_bit(batch), device))
    return torch.cat(parts)


def fid_of_folders(a: str, b: str, inception_weights: str, device: torch.device | str = "cpu") -> float:
    """FID between the images of folders `a` and `b` with the Inception weights file (see
    docs/evaluation.md), computed as `evaluate` computes it."""
    from trainer.evaluation.inception import load_inception

    extractor = load_inception(inception_weights).to(device)
    return fid(folder_features(a, extractor, device), folder_features(b, extractor, device))
