"""Image data sets for training, all held in memory as uint8 [N, C, H, W] with int64 labels.

- ``"digits"``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; shipped with
  scikit-learn, nothing is downloaded).
- A folder or an uncompressed zip of PNG images with an optional ``dataset.json`` holding
  ``{"labels": [[relative_path, label], ...]}`` (the EDM2 dataset layout).
- An ``.npz`` file with ``images`` ([N, H, W], [N, H, W, C] or [N, C, H, W], uint8) and
  optionally ``labels`` ([N] integers).

Labels are integers in [0, :data:`MAX_CLASSES`); anything else is refused with the file named.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "MAX_CLASSES",
    "ImageDataset",
    "ImageFiles",
    "load_dataset",
    "open_images",
    "read_npz",
    "read_png",
    "to_float",
]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (inverse of ``generation.to_uint8`` up to rounding)."""
    return images.to(torch.float32) / 127.5 - 1


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
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(d.target.astype(np.int64)), 10, "digits")


def read_png(data: bytes, name: str) -> tuple[np.ndarray, dict[str, str]]:
    """A PNG file's bytes -> uint8 [H, W, C] (palette images as RGB/RGBA) and its text chunks;
    ValueError naming ``name`` when it is not a readable 8-bit image."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.mode in ("P", "PA"):  # palette indices are not intensities
            img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
        elif img.mode == "1":
            img = img.convert("L")
        arr = np.asarray(img)
        text = dict(getattr(img, "text", {}))
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not an image file (damaged or not a PNG)") from None
    except Exception as e:  # PIL raises several exception types for damaged files
        raise ValueError(f"{name}: not a readable PNG image ({e})") from None
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: images must be 8-bit, got {arr.dtype}")
    return (arr[:, :, None] if arr.ndim == 2 else arr), text


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
    from .checkpoint import check_regular_file

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


# Zip entries are inflated only up to what their content can need: a 1 MB zip may declare (or
# hold) a 1 GiB entry. The bound comes from the entry's own header (PNG IHDR, .npy header), read
# first, else from a flat cap.
_MAX_ENTRY = 256 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _entry_limit(head: bytes) -> int:
    """Most bytes an entry that starts with ``head`` can legitimately hold."""
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        depth, color = head[24], head[25]
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color, 4)
        raw = h * (1 + (w * channels * max(depth, 1) + 7) // 8)  # filter byte + packed row
        return min(_MAX_ENTRY, raw + raw // 64 + (1 << 20))  # deflate's stored blocks + chunks
    if head.startswith(b"\x93NUMPY"):
        readers = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}
        try:
            shape, _, dtype = readers[head[6]](io.BytesIO(head[8:]))
            return min(_MAX_ENTRY, int(np.prod(shape)) * np.dtype(dtype).itemsize + 4096)
        except Exception:  # an unreadable header: the flat cap, and np.load refuses it later
            pass
    return _MAX_ENTRY


def read_entry(z: zipfile.ZipFile, name: str, where: str) -> bytes:
    """A zip entry's bytes, refused (ValueError naming it) when its declared or actual size is
    beyond what its header allows, before inflating it."""
    info = z.getinfo(name)
    with z.open(info) as f:
        head = f.read(512)
        limit = _entry_limit(head)
        if info.file_size > limit:
            raise ValueError(
                f"{where}: the entry declares {info.file_size} bytes, more than its content can hold "
                f"({limit}); refusing to inflate it (a damaged or hostile zip)"
            )
        data = head + f.read(limit + 1 - len(head))
    if len(data) > limit:
        raise ValueError(
            f"{where}: the entry inflates past {limit} bytes; refusing it (a damaged or hostile zip)"
        )
    return data


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
        from .checkpoint import check_regular_file

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
        from .checkpoint import check_regular_file

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
