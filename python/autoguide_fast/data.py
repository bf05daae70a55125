"""Image data sets for training, all held in memory as uint8 [N, C, H, W] with int64 labels.

- ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; shipped with
  scikit-learn, nothing is downloaded).
- A folder or an uncompressed zip of PNG images with an optional ``dataset.json`` holding
  ``{"labels": [[relative_path, label], ...]}`` (the EDM2 dataset layout).
- An ``.npz`` file with ``images`` ([N, H, W], [N, H, W, C] or [N, C, H, W], uint8) and
  optionally ``labels`` ([N] integers).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["ImageDataset", "load_dataset", "to_float"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (inverse of ``generation.to_uint8`` up to rounding)."""
    return images.to(torch.float32) / 127.5 - 1


_IMAGE_SUFFIXES = (".png",)


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
        return dict(name=self.name, size=len(self), resolution=self.resolution, channels=self.channels,
                    num_classes=self.num_classes if self.labels is not None else 0)  # fmt: skip


def _digits() -> ImageDataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(d.target.astype(np.int64)), 10, "digits")


def _decode_png(data: bytes, name: str) -> np.ndarray:
    from PIL import Image

    try:
        img = np.asarray(Image.open(io.BytesIO(data)))
    except Exception as e:  # PIL raises several exception types for bad files
        raise ValueError(f"{name}: not a readable PNG image ({e})") from None
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: images must be 8-bit, got {img.dtype}")
    return img[:, :, None] if img.ndim == 2 else img


def _from_files(path: Path, files: dict[str, bytes]) -> ImageDataset:
    names = sorted(n for n in files if n.lower().endswith(_IMAGE_SUFFIXES))
    if not names:
        raise ValueError(f"{path}: no PNG images found")
    arrays = [_decode_png(files[n], f"{path}/{n}") for n in names]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(
            f"{path}: all images must have the same size and channels, found {sorted(shapes)[:4]}"
        )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    labels, num_classes = None, 0
    if "dataset.json" in files:
        entries = json.loads(files["dataset.json"]).get("labels")
        if entries is not None:
            table = {str(k).replace("\\", "/"): v for k, v in entries}
            missing = [n for n in names if n not in table]
            if missing:
                raise ValueError(
                    f"{path}/dataset.json: no label for {len(missing)} images, e.g. {missing[0]}"
                )
            labels = torch.tensor([int(table[n]) for n in names], dtype=torch.int64)
            num_classes = int(labels.max()) + 1
    return ImageDataset(images, labels, num_classes, path.name)


def _npz(path: Path) -> ImageDataset:
    with np.load(path, allow_pickle=False) as z:
        if "images" not in z:
            raise ValueError(f"{path}: an .npz data set needs an 'images' array, found {sorted(z.keys())}")
        images = z["images"]
        labels = z["labels"] if "labels" in z else None
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
    lab = None
    if labels is not None:
        if labels.shape != (len(images),):
            raise ValueError(f"{path}: labels must be [N] with N = {len(images)} images, got {labels.shape}")
        lab = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(images)),
        lab,
        int(lab.max()) + 1 if lab is not None else 0,
        path.stem,
    )


def load_dataset(source: str | Path) -> ImageDataset:
    """``"digits"``, a folder or ``.zip`` of PNGs (optional ``dataset.json``), or an ``.npz``."""
    if str(source) == "digits":
        return _digits()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data set not found: {path} (use 'digits', a folder, a .zip or a .npz)")
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
        return _from_files(path, files)
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            return _from_files(path, {n: z.read(n) for n in z.namelist() if not n.endswith("/")})
    if path.suffix == ".npz":
        return _npz(path)
    raise ValueError(f"data set must be 'digits', a folder, a .zip or a .npz, got {path}")
