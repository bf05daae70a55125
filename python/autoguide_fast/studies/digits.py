"""Evaluation on the embedded digits set: a small classifier trained by the project (weights
ship with the package), Frechet distance in its feature space (FD_digits), k-NN precision and
recall, and conditioning alignment (share of class-conditional samples classified as their
class)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import load
from ..data import load_dataset, read_npz, to_float
from ..metrics import feature_stats, frechet_distance, knn_precision_recall

__all__ = [
    "DigitsClassifier",
    "evaluate",
    "load_classifier",
    "load_reference",
    "reference_stats",
    "train_classifier",
]

ASSET = Path(__file__).parents[1] / "assets" / "digits_classifier.safetensors"


class DigitsClassifier(torch.nn.Module):
    """CNN for 8x8 digits in [-1, 1]; ``features`` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 2 * 2, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return torch.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _split(seed: int = 0):
    d = load_dataset("digits")
    perm = torch.randperm(len(d), generator=torch.Generator().manual_seed(seed))
    n_test = len(d) // 5
    x = to_float(d.images)
    return (x[perm[n_test:]], d.labels[perm[n_test:]]), (x[perm[:n_test]], d.labels[perm[:n_test]])


def train_classifier(
    epochs: int = 40, seed: int = 0, progress: bool = False
) -> tuple[DigitsClassifier, float]:
    """Trains the classifier on 80% of the digits (fixed split) with small random shifts;
    returns it (eval mode) and its accuracy on the held-out 20%."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    (xtr, ytr), (xte, yte) = _split()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    epochs_iter = range(epochs)
    if progress:
        epochs_iter = tqdm(epochs_iter, desc="digits classifier", unit="epoch")
    for _ in epochs_iter:
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
            xb = torch.roll(xtr[idx], shifts=(dx, dy), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(net(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(xte).argmax(1) == yte).float().mean())
    return net, acc


def load_classifier(path: str | os.PathLike | None = None) -> DigitsClassifier:
    """The shipped classifier (or one saved at ``path`` by ``autoguide classifier``)."""
    net = DigitsClassifier()
    net.load_state_dict(load(path or ASSET))
    return net.eval().requires_grad_(False)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(
            f"images must be uint8 [N, 1, 8, 8] digits, got {images.dtype} {tuple(images.shape)}"
        )
    return to_float(images)


@torch.no_grad()
def reference_stats(classifier: DigitsClassifier | None = None) -> dict[str, np.ndarray]:
    """Features, their mean and covariance for all 1797 real digits."""
    classifier = classifier or load_classifier()
    feats = classifier.features(_as_float(load_dataset("digits").images))
    mu, cov = feature_stats(feats)
    return dict(features=feats.numpy(), mu=mu, cov=cov)


_REF_SHAPES = {"features": (None, 128), "mu": (128,), "cov": (128, 128)}


def load_reference(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reference statistics saved by ``autoguide eval --save-ref`` (as :func:`reference_stats`
    returns them), checked: ValueError naming the file when a key or shape is wrong."""
    ref, _ = read_npz(Path(path), tuple(_REF_SHAPES))
    for key, shape in _REF_SHAPES.items():
        if key not in ref:
            raise ValueError(f"{path}: reference statistics need a {key!r} array (from --save-ref)")
        a = ref[key]
        if a.ndim != len(shape) or any(n is not None and n != m for n, m in zip(shape, a.shape)):
            raise ValueError(f"{path}: {key!r} must be {shape} (None: any), got {a.shape}")
        if a.dtype.kind != "f" or not np.isfinite(a).all():
            raise ValueError(f"{path}: {key!r} must hold finite floats, got {a.dtype}")
    if len(ref["features"]) < 2:
        raise ValueError(f"{path}: 'features' must hold at least 2 rows, got {len(ref['features'])}")
    return ref


@torch.no_grad()
def check_images(images: torch.Tensor, classes: torch.Tensor | None = None, where: str = "images") -> None:
    """What :func:`evaluate` measures: at least 4 uint8 digits [N, 1, 8, 8] (k-NN precision and
    recall with k = 3) and classes None or [N] digits 0..9; ValueError naming ``where`` otherwise."""
    if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(
            f"{where}: the digits metrics measure 8x8 grey digits, uint8 [N, 1, 8, 8], got {images.dtype} "
            f"[N, C, H, W] = {tuple(images.shape)}"
        )
    if len(images) < 4:
        raise ValueError(f"{where}: the digits metrics need at least 4 images, got {len(images)}")
    if classes is not None:
        if classes.shape != (len(images),):
            raise ValueError(
                f"{where}: classes must be [N] with N = {len(images)}, got {tuple(classes.shape)}"
            )
        if int(classes.min()) < 0 or int(classes.max()) > 9:
            raise ValueError(
                f"{where}: classes must be digit classes 0..9, got {int(classes.min())}..{int(classes.max())}"
            )


def evaluate(
    images: torch.Tensor,
    classes: torch.Tensor | None = None,
    ref: dict[str, np.ndarray] | None = None,
    classifier: DigitsClassifier | None = None,
    k: int = 3,
) -> dict[str, float]:
    """FD_digits, k-NN precision/recall (against the real digits' features) and, when the
    conditioning ``classes`` [N] are given, alignment, for uint8 images [N, 1, 8, 8]."""
    check_images(images, classes)
    classifier = classifier or load_classifier()
    ref = ref or reference_stats(classifier)
    x = _as_float(images)
    feats = classifier.features(x)
    mu, cov = feature_stats(feats)
    precision, recall = knn_precision_recall(torch.as_tensor(ref["features"]), feats, k=k)
    out = dict(fd=frechet_distance(mu, cov, ref["mu"], ref["cov"]), precision=precision, recall=recall)
    if classes is not None:
        out["alignment"] = float((classifier.fc2(feats).argmax(1) == classes).float().mean())
    return out
