"""A small classifier that ganforge trains on the run's own labelled images and caches.

It is the offline default feature extractor for digit data ("FID-digits"): no weights have
to be downloaded, and the same dataset (same index fingerprint) always gives the same network.
Its penultimate layer gives the features; its predictions give class coverage.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.index import ShardIndex
from trainer.evaluation.errors import EvaluationError
from trainer.evaluation.real_data import has_labels, read_samples

VERSION = 2  # bump when the architecture or the training recipe changes: old caches are ignored
SIDE = 32  # images are resized to SIDE x SIDE: one architecture for every resolution
FEATURES = 128


class DigitsClassifier(nn.Module):
    """Three strided convs and two linear layers; `features` is the 128-d layer before the last ReLU."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.convs = nn.Sequential(
            nn.Conv2d(channels, 32, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, 2, 1), nn.BatchNorm2d(128), nn.ReLU(),
        )
        self.fc = nn.Linear(128 * (SIDE // 8) ** 2, FEATURES)
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-1] != SIDE or x.shape[-2] != SIDE:
            x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False, antialias=True)
        return self.fc(self.convs(x).flatten(1))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from `features` (so gathered features suffice to predict classes)."""
        return self.head(F.relu(features.float()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(images))


class ClassifierFeatures(nn.Module):
    """Feature-extractor face of a trained DigitsClassifier: images in [-1, 1] -> 128-d features."""

    num_features = FEATURES

    def __init__(self, net: DigitsClassifier, key: str, accuracy: float):
        super().__init__()
        self.net = net.eval()
        self.key, self.accuracy = key, accuracy

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)

    @torch.no_grad()
    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.classify(features)


def _shift(images: torch.Tensor, gen: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translations by up to `pixels`: robustness to small misalignments in generated digits."""
    padded = F.pad(images, [pixels] * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=gen).tolist()
    return padded[..., dy:dy + images.shape[-2], dx:dx + images.shape[-1]]


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 6,
                     seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Train on 90% of (images in [-1, 1], labels), deterministically; returns (net, held-out accuracy)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsClassifier(images.shape[1], num_classes)
    order = torch.randperm(len(images), generator=gen)
    n_test = max(1, len(images) // 10)
    test, train = order[:n_test], order[n_test:]
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * ((len(train) + 63) // 64))
    net.train()
    for _ in range(epochs):
        perm = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(_shift(images[idx], gen)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(images[test]).argmax(1) == labels[test]).float().mean())
    return net, accuracy


def cache_path(cache_dir: str, fingerprint: str) -> str:
    return os.path.join(cache_dir, f"digits_classifier_{fingerprint}_v{VERSION}.pt")


def load_or_train(index: ShardIndex, cache_dir: str, log=print) -> ClassifierFeatures:
    """The classifier for this dataset: from `cache_dir` when cached, else trained on all its samples and cached."""
    if index.kind != "image" or not has_labels(index):
        raise EvaluationError(f"{index.root}: the digits classifier needs labelled images (a 'cls' member); "
                              "give Inception weights instead (eval.inception_weights=PATH)")

    def samples() -> tuple[torch.Tensor, torch.Tensor, int]:
        images, labels = read_samples(index, np.arange(index.num_samples))
        return images, labels, max(int(labels.max()) + 1, len(index.meta.get("label_names") or []))

    return cached_classifier(cache_dir, index.fingerprint(), samples, index.root, log)


def cached_classifier(cache_dir: str, fingerprint: str,
                      samples: Callable[[], tuple[torch.Tensor, torch.Tensor, int]], name: str,
                      log=print) -> ClassifierFeatures:
    """The classifier of the labelled images `fingerprint` names: cached, or trained on `samples()` and cached.

    `samples()` gives (images in [-1, 1], labels, number of classes); it is called only on a cache miss.
    """
    path = cache_path(cache_dir, fingerprint)
    key = f"digits-{fingerprint}-v{VERSION}"
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            net = DigitsClassifier(int(saved["channels"]), int(saved["num_classes"]))
            net.load_state_dict(saved["state_dict"])
            return ClassifierFeatures(net, key, float(saved["accuracy"]))
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
            log(f"ganforge eval: ignoring unreadable classifier cache {path} ({type(e).__name__}); retraining")
    images, labels, num_classes = samples()
    log(f"ganforge eval: training the feature classifier on {len(images)} images of {name} "
        f"(cached in {path})")
    net, accuracy = train_classifier(images, labels, num_classes)
    log(f"ganforge eval: classifier held-out accuracy {accuracy:.3f}")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"state_dict": net.state_dict(), "channels": net.channels, "num_classes": num_classes,
                "accuracy": accuracy, "fingerprint": fingerprint, "version": VERSION}, tmp)
    os.replace(tmp, path)
    return ClassifierFeatures(net, key, accuracy)
