"""Streaming image sources (metrics and training over data sets of any size): one image decoded
at a time, from a folder, a zip or an ``.npz``."""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..files import check_regular_file
from ..images import read_png
from .archive import read_entry
from .sets import _info, _json_labels, _npz

__all__ = ["ImageFiles", "open_images"]

_STREAM_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_LATENT_SUFFIX = ".npy"  # the official latent layout: per image float32 [2C, H, W] = (mean, std)
_PREVIEW = "grid.png"  # the preview grid older `autoguide generate` versions wrote among the images


class ImageFiles(torch.utils.data.Dataset):
    """The images of a folder (recursive), a zip or an ``.npz``, in file-name order, decoded on
    demand: ``ds[i]`` is uint8 [C, H, W]. A zip is opened once per process (DataLoader workers
    each open their own); an ``.npz`` is read whole (numpy cannot stream it). ``grid.png``, the
    preview older versions of ``autoguide generate`` wrote beside the images, is not one of them.
    Labels come from ``dataset.json`` (the EDM2 layout) as in :func:`load_dataset`; the shape of
    every image is that of the first (checked as each is read)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = 0
        self._array: np.ndarray | None = None
        self.labels: torch.Tensor | None = None
        meta = None
        if not self.path.exists():
            raise FileNotFoundError(f"images not found: {self.path} (give a folder, a .zip or an .npz)")
        if self.path.is_dir():
            self.names = sorted(
                p.relative_to(self.path).as_posix()
                for p in self.path.rglob("*")
                if p.is_file()
                and p.name.lower().endswith((*_STREAM_SUFFIXES, _LATENT_SUFFIX))
                and p.name != _PREVIEW
            )
            if (self.path / "dataset.json").is_file():
                meta = (self.path / "dataset.json").read_bytes()
        elif self.path.suffix.lower() == ".zip":
            check_regular_file(self.path)
            try:
                with zipfile.ZipFile(self.path) as z:
                    names = z.namelist()
                    meta = (
                        read_entry(z, "dataset.json", f"{self.path}/dataset.json")
                        if "dataset.json" in names
                        else None
                    )
            except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as e:
                raise ValueError(f"{self.path}: not a readable zip file ({e})") from None
            self.names = sorted(
                n
                for n in names
                if n.lower().endswith((*_STREAM_SUFFIXES, _LATENT_SUFFIX))
                and n.rsplit("/", 1)[-1] != _PREVIEW
            )
        elif self.path.suffix.lower() == ".npz":
            ds = _npz(self.path)
            self._array, self.labels = ds.images.numpy(), ds.labels
            self.names = [f"{self.path.name}[{i}]" for i in range(len(self._array))]
        else:
            raise ValueError(f"images must be a folder, a .zip or an .npz, got {self.path}")
        if not self.names:
            raise ValueError(
                f"{self.path}: holds no images ({', '.join(_STREAM_SUFFIXES)}) or latents (.npy)"
            )
        # Official latent data sets (dataset_tool.py encode) hold only .npy files.
        self.latent = self.names[0].lower().endswith(_LATENT_SUFFIX)
        if any(n.lower().endswith(_LATENT_SUFFIX) != self.latent for n in self.names):
            raise ValueError(f"{self.path}: mixes images and .npy latents")
        if meta is not None:
            self.labels = _json_labels(f"{self.path}/dataset.json", meta, self.names)
        self.num_classes = int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0
        self.shape = tuple(self._image(0).shape)  # [C, H, W] of every image

    def __len__(self) -> int:
        return len(self.names)

    @property
    def resolution(self) -> int:
        return self.shape[1]

    @property
    def channels(self) -> int:
        """Channels of a sample: the image's, or a latent's (half of the stored mean and std)."""
        return self.shape[0] // 2 if self.latent else self.shape[0]

    @property
    def name(self) -> str:  # as load_dataset names the same source
        return self.path.stem if self.path.suffix.lower() == ".npz" else self.path.name

    def info(self) -> dict:
        """JSON-serialisable description stored in snapshot metadata (as ``ImageDataset.info``)."""
        return _info(self)

    def _bytes(self, name: str) -> bytes:
        if self.path.is_dir():
            return (self.path / name).read_bytes()
        # One open zip per process: forked DataLoader workers inherit the parent's file object,
        # whose shared file offset would interleave their reads.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        try:
            return read_entry(self._zip, name, f"{self.path}/{name}")
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise ValueError(f"{self.path}/{name}: damaged zip entry ({e})") from None

    def _image(self, i: int) -> torch.Tensor:
        if self._array is not None:
            return torch.from_numpy(np.ascontiguousarray(self._array[i]))
        name = self.names[i]
        if self.latent:
            return _read_latent(self._bytes(name), f"{self.path}/{name}")
        arr = read_png(self._bytes(name), f"{self.path}/{name}")[0]
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())  # PIL's arrays are read-only

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self._image(i)
        if tuple(image.shape) != self.shape:
            raise ValueError(
                f"{self.path}/{self.names[i]}: image of shape {tuple(image.shape)}, the first is {self.shape}"
            )
        return image

    def __getstate__(self):  # DataLoader workers: each opens the zip anew
        return {**self.__dict__, "_zip": None}


def _read_latent(data: bytes, where: str) -> torch.Tensor:
    """An official latent entry: float32 [2C, H, W] (the VAE posterior's mean and std), read as
    plain data (no pickles)."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{where}: not a readable .npy array ({e})") from None
    if arr.dtype != np.float32 or arr.ndim != 3 or arr.shape[0] % 2 or not np.isfinite(arr).all():
        raise ValueError(f"{where}: a latent must be finite float32 [2C, H, W], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.copy())


def open_images(path: str | Path) -> ImageFiles:
    """A streaming :class:`ImageFiles` over a folder, a zip or an ``.npz`` of images."""
    return ImageFiles(path)
