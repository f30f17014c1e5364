"""Offline image-to-image datasets built from pictures that ship inside installed packages.

Nothing is downloaded: scikit-image's bundled `skimage.data` files (only the ones inside the
wheel) and scikit-learn's two sample photos are cut into crops and written as shards.

- `sample_images`: unpaired textures, grass (domain A) and gravel (domain B), for CycleGAN.
  `ROOT/trainA`, `ROOT/trainB`, `ROOT/testA`, `ROOT/testB` (shards) and
  `ROOT/images/testA`, `ROOT/images/testB` (the held-out crops as PNG files).
- `edges2photos`: pairs of (Canny edge map, photo crop) of scikit-image's `gravel`, `brick`
  and `coins`, for pix2pix. `ROOT/train`, `ROOT/test` (paired shards) and `ROOT/images/test`
  (the held-out edge maps as PNG files).
- `sr_photos`: native-resolution patches of scikit-image's and scikit-learn's colour photographs,
  for super-resolution. `ROOT/train` (patches of side size + size // 2, so the loader can still
  crop at random), `ROOT/test` (held-out patches of side size), `ROOT/images/test_hr` and
  `ROOT/images/test_lr_x4` (the held-out patches and their bicubic x4 downsampling as PNG files).

Training and held-out crops come from disjoint regions of each picture (the top 3/4 of its
rows, and the bottom 1/4; for sr_photos' landscape pictures the left 3/4 of the columns and the
right 1/4, since their bottom quarter is too short for a held-out patch of 128 pixels), so the
held-out split measures generalisation. A build is a pure
function of (name, size, seed); it is written to a temporary directory and renamed into place
under a file lock, so many processes can ask for it at once and exactly one builds it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from data_pipeline.degrade import bicubic_down
from data_pipeline.errors import DataError
from data_pipeline.sources import encode_image
from data_pipeline.writer import write_shards

TEXTURES = {"A": "grass.png", "B": "gravel.png"}
# Photos whose look follows from their edges (stones, bricks, coins): a small pix2pix learns them
# on a CPU in minutes. Edge maps of varied scenes (faces, rooms) leave colour and shading
# ambiguous, and a CPU budget only learns their mean colour.
EDGE_PHOTOS = ("gravel.png", "brick.png", "coins.png")
# Colour photographs with fine detail, for super-resolution (scikit-learn ships two more).
SR_SKIMAGE = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
SR_SKLEARN = ("china.jpg", "flower.jpg")
TRAIN_ROWS = 0.75  # training crops come from the top 3/4 of each picture, held-out ones from the rest


def _skimage_picture(name: str) -> Image.Image:
    import skimage.data

    path = os.path.join(os.path.dirname(skimage.data.__file__), name)
    if not os.path.exists(path):
        raise DataError(f"{path}: missing from the installed scikit-image (reinstall it with `make install`)")
    return Image.open(path).convert("RGB")


def _crops(picture: Image.Image, n: int, size: int, held_out: bool, rng: np.random.Generator,
           scale: tuple[float, float]) -> Iterator[Image.Image]:
    """n random square crops (side a `scale` fraction of the picture's shorter side), resized to size."""
    w, h = picture.size
    split = int(h * TRAIN_ROWS)
    top, bottom = (split, h) if held_out else (0, split)
    for _ in range(n):
        side = int(min(w, h) * rng.uniform(*scale))
        side = max(size // 2, min(side, bottom - top, w))
        x = int(rng.integers(0, w - side + 1))
        y = int(rng.integers(top, bottom - side + 1))
        crop = picture.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
        yield crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def edge_map(photo: Image.Image, sigma: float = 2.0) -> Image.Image:
    """Black Canny edges on white (as in edges2shoes), three channels."""
    from skimage.feature import canny

    gray = np.asarray(photo.convert("L"), dtype=np.float32) / 255.0
    edges = canny(gray, sigma=sigma)
    return Image.fromarray(np.where(edges, 0, 255).astype(np.uint8)).convert("RGB")


def _save_pngs(images: list[Image.Image], folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        img.save(os.path.join(folder, f"{i:04d}.png"))


def _write(images: list[Image.Image] | list[tuple[Image.Image, Image.Image]], out: str, kind: str,
           meta: dict) -> None:
    if kind == "paired":
        samples = ((f"{i:07d}", {"a.png": encode_image(a), "b.png": encode_image(b)}) for i, (a, b) in enumerate(images))
    else:
        samples = ((f"{i:07d}", {"png": encode_image(img)}) for i, img in enumerate(images))
    write_shards(samples, out, kind=kind, meta=meta | {"channels": 3, "image_ext": "png"}, samples_per_shard=256)


def build_sample_images(root: str, size: int = 64, n_train: int = 1024, n_test: int = 64, seed: int = 0) -> None:
    """Grass (A) and gravel (B) texture crops: unpaired domains for CycleGAN."""
    for domain, name in TEXTURES.items():
        picture = _skimage_picture(name)
        rng = np.random.default_rng([seed, ord(domain)])
        meta = {"source": "sample_images", "size": size, "picture": name}
        train = list(_crops(picture, n_train, size, False, rng, (0.12, 0.3)))
        test = list(_crops(picture, n_test, size, True, rng, (0.12, 0.24)))
        _write(train, os.path.join(root, f"train{domain}"), "image", meta)
        _write(test, os.path.join(root, f"test{domain}"), "image", meta)
        _save_pngs(test, os.path.join(root, "images", f"test{domain}"))


def build_edges2photos(root: str, size: int = 64, n_train: int = 1500, n_test: int = 72, seed: int = 0) -> None:
    """(edge map, photo) pairs from crops of the packaged photos: paired data for pix2pix."""
    pictures = [_skimage_picture(n) for n in EDGE_PHOTOS]
    rng = np.random.default_rng([seed, 2])
    meta = {"source": "edges2photos", "size": size, "pictures": list(EDGE_PHOTOS)}
    for split, n, held_out in (("train", n_train, False), ("test", n_test, True)):
        photos = [crop for pic in pictures for crop in _crops(pic, n // len(pictures), size, held_out, rng, (0.2, 0.4))]
        pairs = [(edge_map(p), p) for p in photos]
        _write(pairs, os.path.join(root, split), "paired", meta)
        if held_out:
            _save_pngs([a for a, _ in pairs], os.path.join(root, "images", split))


Box = tuple[int, int, int, int]  # (left, top, right, bottom), as PIL's crop takes it


def _sr_pictures() -> dict[str, Image.Image]:
    from sklearn.datasets import load_sample_image

    pictures = {name: _skimage_picture(name) for name in SR_SKIMAGE}
    return pictures | {name: Image.fromarray(load_sample_image(name)).convert("RGB") for name in SR_SKLEARN}


def sr_regions(width: int, height: int) -> tuple[Box, Box]:
    """(training, held-out) regions of a picture: 3/4 and 1/4 of its longer side."""
    if height >= width:
        split = int(height * TRAIN_ROWS)
        return (0, 0, width, split), (0, split, width, height)
    split = int(width * TRAIN_ROWS)
    return (0, 0, split, height), (split, 0, width, height)


def _sr_boxes(regions: dict[str, Box], n: int, side: int, rng: np.random.Generator) -> list[tuple[str, Box]]:
    """n square boxes of `side` inside the regions, each region chosen with probability ~ its area."""
    fits = {k: box for k, box in regions.items() if min(box[2] - box[0], box[3] - box[1]) >= side}
    if not fits:
        raise DataError(f"sr_photos: no picture has room for a {side}-pixel patch (use a smaller size)")
    names = list(fits)
    areas = np.array([(r - left) * (b - t) for left, t, r, b in fits.values()], dtype=np.float64)
    boxes = []
    for i in rng.choice(len(names), size=n, p=areas / areas.sum()):
        left, top, right, bottom = fits[names[i]]
        x, y = int(rng.integers(left, right - side + 1)), int(rng.integers(top, bottom - side + 1))
        boxes.append((names[i], (x, y, x + side, y + side)))
    return boxes


def sr_patch_plan(sizes: dict[str, tuple[int, int]], size: int, n_train: int = 832, n_test: int = 64,
                  seed: int = 0) -> dict[str, list[tuple[str, Box]]]:
    """Where sr_photos' patches come from: {"train": [(picture, box)...], "test": [...]}, no I/O.

    `sizes` maps each picture to its (width, height). Training boxes have side size + size // 2 and
    lie in the pictures' training regions, held-out boxes have side size and lie in the rest.
    """
    rng = np.random.default_rng([seed, 3])
    regions = {name: sr_regions(w, h) for name, (w, h) in sizes.items()}
    return {"train": _sr_boxes({k: r[0] for k, r in regions.items()}, n_train, size + size // 2, rng),
            "test": _sr_boxes({k: r[1] for k, r in regions.items()}, n_test, size, rng)}


def build_sr_photos(root: str, size: int = 128, n_train: int = 832, n_test: int = 64, seed: int = 0) -> None:
    """Native-resolution photo patches (never resized: downscaling would erase the detail SR learns)."""
    if size % 4:
        raise DataError(f"sr_photos: size {size} must be a multiple of 4 (held-out LR images are x4 smaller)")
    pictures = _sr_pictures()
    plan = sr_patch_plan({k: p.size for k, p in pictures.items()}, size, n_train, n_test, seed)
    meta = {"source": "sr_photos", "pictures": list(pictures)}
    patches = {split: [pictures[name].crop(box) for name, box in boxes] for split, boxes in plan.items()}
    for split, images in patches.items():
        _write(images, os.path.join(root, split), "image", meta | {"size": images[0].size[0]})
    test = patches["test"]
    _save_pngs(test, os.path.join(root, "images", "test_hr"))
    hr = torch.from_numpy(np.stack([np.asarray(p) for p in test])).permute(0, 3, 1, 2)
    lr = bicubic_down(hr, 4).permute(0, 2, 3, 1).numpy()
    _save_pngs([Image.fromarray(a) for a in lr], os.path.join(root, "images", "test_lr_x4"))


BUILDERS: dict[str, Callable[..., None]] = {"sample_images": build_sample_images, "edges2photos": build_edges2photos,
                                            "sr_photos": build_sr_photos}


def ensure_built(name: str, root: str, size: int) -> bool:
    """Build packaged dataset `name` into `root` unless it is there; True when this call built it.

    Safe to call from every process of a job at once: the first to take the lock builds (into a
    temporary directory, renamed into place), the others wait and then find it complete.
    """
    if name not in BUILDERS:
        raise DataError(f"unknown packaged dataset {name!r} (choose from {', '.join(BUILDERS)})")
    root = os.path.abspath(root)
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return False
    if os.path.exists(root) and os.listdir(root):
        raise DataError(f"{root}: exists but is not a complete {name} build; remove it to rebuild")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(done):
            return False
        tmp = f"{root}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        BUILDERS[name](tmp, size=size)
        with open(os.path.join(tmp, ".complete"), "w") as f:
            f.write(f"{name} size={size}\n")
        if os.path.isdir(root):
            os.rmdir(root)  # empty (checked above)
        os.replace(tmp, root)
    return True
