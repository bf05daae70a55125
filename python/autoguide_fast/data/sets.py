"""Image data sets for training, all held in memory as uint8 [N, C, H, W] with int64 labels.

- ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; shipped with
  scikit-learn, nothing is downloaded).
- A folder or an uncompressed zip of PNG images with an optional ``dataset.json`` holding
  ``{"labels": [[relative_path, label], ...]}`` (the EDM2 dataset layout).
- An ``.npz`` file with ``images`` ([N, H, W], [N, H, W, C] or [N, C, H, W], uint8) and
  optionally ``labels`` ([N] integers).

Labels are integers in [0, :data:`MAX_CLASSES`); anything else is refused with the file named.
:func:`read_images` reads back what ``autoguide generate`` wrote (PNGs with their class, or an
``.npz``).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..files import check_regular_file
from ..images import read_png, to_float
from .archive import read_entry

__all__ = ["MAX_CLASSES", "ImageDataset", "load_dataset", "read_images", "read_npz"]


_IMAGE_SUFFIXES = (".png",)

# Labels become one-hot rows [batch, num_classes] and a class embedding [num_classes, channels]
# (num_classes = largest label + 1): 100x ImageNet's 1000 classes is far beyond any data set
# here, while a stray label of 1e9 would ask for gigabytes per batch.
MAX_CLASSES = 100_000


@dataclass
class ImageDataset:
    """Images as uint8 [N, C, H, W] and labels as int64 [N] (or None when unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    name: str

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.images.shape[2] != self.images.shape[3]:
            raise ValueError(f"images must be square, got {self.images.shape[2]}x{self.images.shape[3]}")
        if self.labels is not None:
            if self.labels.shape != (len(self.images),):
                raise ValueError(
                    f"labels must be [N] with N = {len(self.images)} images, got {tuple(self.labels.shape)}"
                )
            if len(self.labels) and (
                int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes
            ):
                raise ValueError(
                    f"labels must be in [0, {self.num_classes}), "
                    f"got {int(self.labels.min())}..{int(self.labels.max())}"
                )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def resolution(self) -> int:
        return self.images.shape[2]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def label_dim(self) -> int:
        """Dimension of one-hot labels (0 when unlabelled)."""
        return self.num_classes if self.labels is not None else 0

    def batch(
        self, indices: torch.Tensor, label_dim: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images in [-1, 1] float32 [B, C, H, W] and one-hot labels [B, label_dim] (None when
        ``label_dim`` is 0 or the data set is unlabelled)."""
        x = to_float(self.images[indices])
        label_dim = self.label_dim if label_dim is None else label_dim
        if label_dim == 0 or self.labels is None:
            return x, None
        return x, torch.nn.functional.one_hot(self.labels[indices], label_dim).to(torch.float32)

    def info(self) -> dict:
        """JSON-serialisable description stored in snapshot metadata."""
        return _info(self)


def _info(ds) -> dict:
    # What identifies a data set in snapshot metadata (in memory or streamed alike).
    classes = ds.num_classes if ds.labels is not None else 0
    return dict(
        name=ds.name, size=len(ds), resolution=ds.resolution, channels=ds.channels, num_classes=classes
    )


def _digits() -> ImageDataset:
    from sklearn.datasets import load_digits  # heavy (~1 s) and only for this data set

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(d.target.astype(np.int64)), 10, "digits")


def _json_labels(where: str, data: bytes, names: list[str]) -> torch.Tensor | None:
    # The EDM2 layout: {"labels": [[relative_path, label], ...]} or {"labels": null}.
    try:
        doc = json.loads(data)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError(
            f'{where}: must be an object {{"labels": [[path, label], ...]}}, got a {type(doc).__name__}'
        )
    entries = doc.get("labels")
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(
            f"{where}: 'labels' must be a list of [path, label] pairs, got a {type(entries).__name__}"
        )
    table = {}
    for e in entries:
        if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)):
            raise ValueError(f"{where}: 'labels' must hold [path, label] pairs, found {json.dumps(e)[:80]}")
        key = e[0].replace("\\", "/")
        if key in table:
            raise ValueError(f"{where}: {key} is labelled twice")
        table[key] = e[1]
    missing = [n for n in names if n not in table]
    if missing:
        raise ValueError(f"{where}: no label for {len(missing)} images, e.g. {missing[0]}")
    for n in names:
        v = table[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v != int(v):
            raise ValueError(f"{where}: labels must be integers, got {json.dumps(v)} for {n}")
        if not 0 <= v < MAX_CLASSES:
            raise ValueError(f"{where}: labels must be in [0, {MAX_CLASSES}), got {int(v)} for {n}")
    return torch.tensor([int(table[n]) for n in names], dtype=torch.int64)


def _array_labels(where: str, labels: np.ndarray) -> torch.Tensor:
    # Checked before anything is sized by them (num_classes = max + 1 sizes one-hot rows).
    if labels.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            raise ValueError(f"{where}: labels must be integers, got {labels[bad][0].item()!r}")
    elif labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be integers, got {labels.dtype} values")
    bad = (labels < 0) | (labels >= MAX_CLASSES)
    if bad.any():
        raise ValueError(f"{where}: labels must be in [0, {MAX_CLASSES}), got {labels[bad][0].item()!r}")
    return torch.from_numpy(labels.astype(np.int64))


def _from_files(path: Path, files: dict[str, bytes]) -> ImageDataset:
    names = sorted(n for n in files if n.lower().endswith(_IMAGE_SUFFIXES))
    if not names:
        raise ValueError(f"{path}: no PNG images found")
    arrays = [read_png(files[n], f"{path}/{n}")[0] for n in names]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"{path}: all images must have the same size and channels, found {sorted(shapes)[:4]}"
        )
    labels = None
    if "dataset.json" in files:
        labels = _json_labels(f"{path}/dataset.json", files["dataset.json"], names)
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    num_classes = int(labels.max()) + 1 if labels is not None else 0
    return ImageDataset(images, labels, num_classes, path.name)


def read_npz(path: Path, keys: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays ``keys`` (those present) of an .npz archive, and the names of all its arrays;
    ValueError naming the file when it is not a readable .npz (nothing is unpickled)."""
    check_regular_file(path)  # a FIFO would block the reader
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not an .npz file (not a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = sorted(z.keys())
            return {k: z[k] for k in keys if k in names}, names
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # object arrays, damage
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None


def _npz(path: Path) -> ImageDataset:
    arrays, keys = read_npz(path, ("images", "labels"))
    images, labels = arrays.get("images"), arrays.get("labels")
    if images is None:
        raise ValueError(f"{path}: an .npz data set needs an 'images' array, found {keys}")
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3, 4) and images.shape[1] == images.shape[2]:
        images = images.transpose(0, 3, 1, 2)  # [N, H, W, C], the numpy convention
    elif images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(
            f"{path}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got {images.shape}"
        )
    if len(images) == 0:
        raise ValueError(f"{path}: 'images' holds no images")
    lab = None
    if labels is not None:
        if labels.shape != (len(images),):
            raise ValueError(f"{path}: labels must be [N] with N = {len(images)} images, got {labels.shape}")
        lab = _array_labels(str(path), labels)
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        lab,
        int(lab.max()) + 1 if lab is not None else 0,
        path.stem,
    )


def _wanted(name: str) -> bool:
    return name.lower().endswith(_IMAGE_SUFFIXES) or name == "dataset.json"


def load_dataset(source: str | Path) -> ImageDataset:
    """``"digits"``, a folder or ``.zip`` of PNGs (optional ``dataset.json``), or an ``.npz``."""
    if str(source) == "digits":
        return _digits()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data set not found: {path} (use 'digits', a folder, a .zip or a .npz)")
    if path.is_dir():
        files = {
            p.relative_to(path).as_posix(): p.read_bytes()
            for p in path.rglob("*")
            if p.is_file() and _wanted(p.relative_to(path).as_posix())
        }
        return _from_files(path, files)
    if path.suffix == ".zip":
        check_regular_file(path)  # a FIFO would block the reader
        try:
            with zipfile.ZipFile(path) as z:
                files = {
                    n: read_entry(z, n, f"{path}/{n}")
                    for n in z.namelist()
                    if not n.endswith("/") and _wanted(n)
                }
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a readable zip file ({e})") from None
        return _from_files(path, files)
    if path.suffix == ".npz":
        return _npz(path)
    raise ValueError(f"data set must be 'digits', a folder, a .zip or a .npz, got {path}")


# ---------------------------------------------------------------------------------------------
# Streaming image sources (metrics over data sets of any size): one image decoded at a time.


def read_images(path: str | os.PathLike):
    """uint8 images [N, C, H, W] and their classes [N] (None unless every image has one) from a
    directory of PNGs written by ``autoguide generate`` (class in a text chunk) or an .npz."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--images {path}: no such directory or .npz file")
    if path.suffix == ".npz" and not path.is_dir():
        ds = load_dataset(path)  # checks the file: 'images' present, uint8, integer labels
        return ds.images, ds.labels
    if not path.is_dir():
        raise ValueError(f"--images must be a directory of PNGs or an .npz file, got the file {path}")
    files = [f for f in sorted(path.rglob("*.png")) if f.name != "grid.png" and f.is_file()]
    if not files:
        raise ValueError(f"--images {path}: the directory holds no PNG images")
    arrays, classes = [], []
    for f in files:
        arr, text = read_png(f.read_bytes(), str(f))
        if arrays and arr.shape != arrays[0].shape:
            raise ValueError(f"{f}: image of shape {arr.shape}, but {files[0]} has {arrays[0].shape}")
        c = text.get("class")
        if c is not None and not c.strip().isdigit():
            raise ValueError(f"{f}: its 'class' text chunk must be a class number, got {c!r}")
        arrays.append(arr)
        classes.append(None if c is None else int(c))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    known = None if any(c is None for c in classes) else torch.tensor(classes, dtype=torch.int64)
    return images, known
