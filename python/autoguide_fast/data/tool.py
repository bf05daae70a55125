"""Data sets in the EDM2 layout, made as NVlabs/edm2's ``dataset_tool.py`` makes them.

- :func:`convert`: a folder or zip of images -> square power-of-two RGB images, stored as
  uncompressed PNGs ``00000/img00000000.png`` ... with ``dataset.json`` holding
  ``{"labels": [[name, label], ...]}`` (or ``null``), in a zip (``ZIP_STORED``) or a folder.
- :func:`encode`: such a pixel data set -> per image the VAE posterior's mean and standard
  deviation, float32 [2 * C, H / f, W / f] (f the VAE's downsampling), stored as
  ``00000/img-mean-std-00000000.npy`` with the labels carried over: the input of latent EDM2
  training (the official ``StabilityVAEEncoder.encode_pixels``).

The output is written to a temporary file or folder beside ``dest`` and renamed over it at the
end: a failed run leaves nothing half-written. Zip entries carry a fixed timestamp, so the same
input gives the same bytes (one process or many).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..files import atomic_path, remove_stale_temporaries, umask
from ..interop.vae import load_vae
from .archive import read_entry
from .transforms import _TRANSFORM_FNS, TRANSFORMS, center_crop, center_crop_dhariwal, center_crop_wide, scale

__all__ = [
    "TRANSFORMS",
    "center_crop",
    "center_crop_dhariwal",
    "center_crop_wide",
    "convert",
    "encode",
    "parse_resolution",
    "scale",
]

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the zip epoch: reproducible archives

# ---------------------------------------------------------------------------------------------
# Argument checks (everything is checked before anything is written).


def parse_resolution(value) -> tuple[int, int] | None:
    """``resolution`` as (width, height): None, an int n (n x n), ``'WxH'``/``'W,H'`` or a pair."""
    if value is None:
        return None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*", value)
        if m is None:
            raise ValueError(f"resolution must be WxH (e.g. 64x64), got {value!r}")
        value = (int(m[1]), int(m[2]))
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = (int(value), int(value))
    if not (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(
            f"resolution must be WxH, an int or a (width, height) pair of positive ints, got {value!r}"
        )
    return int(value[0]), int(value[1])


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_size(transform: str | None, size: tuple[int, int] | None) -> None:
    # Output images must be square with a power-of-two side; center-crop-wide letterboxes a
    # width x height picture onto a width x width canvas.
    if transform is not None and transform not in TRANSFORMS:
        raise ValueError(f"transform must be None or one of {', '.join(TRANSFORMS)}, got {transform!r}")
    if size is None:
        if transform is not None:
            raise ValueError(f"transform {transform!r} needs a resolution (e.g. 64x64)")
        return
    w, h = size
    if transform == "center-crop-wide":
        if not _pow2(w) or h > w:
            raise ValueError(
                f"resolution for center-crop-wide must be WxH with W a power of two and H <= W, got {w}x{h}"
            )
    elif w != h or not _pow2(w):
        raise ValueError(f"resolution must be square with a power-of-two side (e.g. 64x64), got {w}x{h}")


def _check_count(name: str, value, none_ok: bool) -> None:
    if value is None and none_ok:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if none_ok else ''}, got {value!r}")


def _check_dest(dest) -> Path:
    if dest is None or str(dest) == "":
        raise ValueError(f"dest must name a .zip file or a folder, got {dest!r}")
    dest = Path(dest)
    if dest.suffix.lower() == ".zip":
        if dest.is_dir():
            raise ValueError(f"dest {dest} is a folder; a .zip dest must be a file path")
    elif dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"dest {dest} exists and is not an empty folder (name a new folder or a .zip)")
    return dest


# ---------------------------------------------------------------------------------------------
# Reading sources: a folder (recursive) or a zip, images in name order, as the official tool.


class _Images:
    """The images of a folder or zip (names relative, '/'-separated, sorted; extensions PIL reads)
    and their labels: from ``dataset.json`` when it has some, else (folders) the index of each
    image's top-level folder among the sorted top-level names, when there are several."""

    def __init__(self, source, max_images: int | None):
        self.path = Path(source)
        self._zip: zipfile.ZipFile | None = None
        exts = PIL.Image.registered_extensions()
        if self.path.is_dir():
            names = [  # folders reached through links too, as the official os.scandir walk
                Path(root, f).relative_to(self.path).as_posix()
                for root, _, files in os.walk(self.path, followlinks=True)
                for f in files
            ]
            meta = self.path / "dataset.json"
            meta = meta.read_bytes() if meta.is_file() else None
        elif self.path.is_file():
            if self.path.suffix.lower() != ".zip":
                raise ValueError(f"source must be a folder or a .zip of images, got the file {self.path}")
            try:
                with zipfile.ZipFile(self.path) as z:
                    names = [n for n in z.namelist() if not n.endswith("/")]
                    where = f"{self.path}/dataset.json"
                    meta = read_entry(z, "dataset.json", where) if "dataset.json" in names else None
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"source {self.path}: not a readable zip file ({e})") from None
        else:
            raise FileNotFoundError(f"source not found: {self.path} (give a folder or a .zip of images)")
        names = sorted(n for n in names if "." + n.rsplit(".", 1)[-1].lower() in exts)
        if not names:
            raise ValueError(f"source {self.path} holds no images")
        self.names = names[:max_images]
        labels = self._json_labels(meta) if meta is not None else {}
        if not labels and self.path.is_dir():
            top = {n: n.split("/")[0] if "/" in n else "" for n in names}
            classes = {t: i for i, t in enumerate(sorted(set(top.values())))}
            if len(classes) > 1:
                labels = {n: classes[t] for n, t in top.items()}
        self.labels = [labels.get(n) for n in self.names]
        if self.path.is_file():
            self._zip = zipfile.ZipFile(self.path)  # kept open while the images are read

    def _json_labels(self, data: bytes) -> dict:
        where = f"{self.path}/dataset.json"
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or "labels" not in doc:
            raise ValueError(f'{where}: must be {{"labels": [[path, label], ...] or null}}')
        entries = doc["labels"] or []
        if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in entries
        ):
            raise ValueError(f"{where}: 'labels' must be a list of [path, label] pairs")
        return {e[0].replace("\\", "/"): e[1] for e in entries}

    def __len__(self) -> int:
        return len(self.names)

    def pixels(self, i: int) -> np.ndarray:
        """Image i as uint8 RGB [H, W, 3] (grey, palette and RGBA converted by PIL, alpha dropped)."""
        name = self.names[i]
        try:
            # Zip entries through the shared bounded reader (no entry inflates past its header).
            f = (
                io.BytesIO(read_entry(self._zip, name, f"{self.path}/{name}"))
                if self._zip is not None
                else open(self.path / name, "rb")
            )
            with f, PIL.Image.open(f) as img:
                return np.asarray(img.convert("RGB"))
        except (OSError, ValueError, zipfile.BadZipFile) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"{self.path}/{name}: not a readable image ({e})") from None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


@contextlib.contextmanager
def _images(source, max_images: int | None) -> Iterator[_Images]:
    src = _Images(source, max_images)
    try:
        yield src
    finally:
        src.close()


# ---------------------------------------------------------------------------------------------
# Writing: a zip (stored, not compressed) or a folder, renamed into place when complete.


@contextlib.contextmanager
def _writer(dest: Path) -> Iterator[Callable[[str, bytes], None]]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(dest.parent)  # of a run that was killed while writing
    if dest.suffix.lower() == ".zip":
        with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:

            def write(name: str, data: bytes) -> None:
                info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                info.external_attr = 0o600 << 16  # what ZipFile.writestr gives a named entry
                z.writestr(info, data)

            yield write
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=f".{os.getpid()}.tmp", dir=dest.parent))

    def write(name: str, data: bytes) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    try:
        yield write
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's folder is private
        if dest.exists():
            dest.rmdir()  # checked empty before
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _png(img: np.ndarray) -> bytes:
    # Uncompressed PNG: fast to decode in the training loop.
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="png", compress_level=0, optimize=False)
    return buf.getvalue()


def _name(i: int, stem: str, ext: str) -> str:
    # 00000/img00000000.png: 100000 files per folder.
    return f"{i:08d}"[:5] + f"/{stem}{i:08d}.{ext}"


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr))
    return buf.getvalue()


def _labels_json(entries: list) -> bytes:
    # Labels of all images, or null when any image has none (the official rule and formatting).
    return json.dumps({"labels": entries if all(e is not None for e in entries) else None}).encode()


# ---------------------------------------------------------------------------------------------
# The two commands.


def convert(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    transform: str | None = None,
    resolution: int | str | tuple[int, int] | None = None,
    max_images: int | None = None,
    progress: bool = False,
) -> dict:
    """Converts a folder (recursive) or zip of images into a pixel data set, as the official
    ``dataset_tool.py convert``.

    Args:
        source: folder or ``.zip`` of images (any format PIL reads), taken in name order and
            converted to RGB. Labels from its ``dataset.json`` (``{"labels": [[path, label], ...]}``)
            or, for a folder without one, the index of each image's top-level folder when there
            are several.
        dest: a ``.zip`` (replaced if it exists) or a folder (new or empty).
        transform: None (resize to ``resolution`` if given, else keep: the images must already be
            square, power-of-two and of one size), ``"center-crop"``, ``"center-crop-wide"``
            (images too small are skipped; the output keeps their index free) or
            ``"center-crop-dhariwal"`` (ADM's ImageNet crop).
        resolution: output WxH: ``64``, ``"64x64"`` or ``(64, 64)``; square with a power-of-two
            side, except that center-crop-wide takes W x H with H <= W onto a W x W canvas.
        max_images: read at most this many source images (None: all).
        progress: show a progress bar.

    Returns:
        ``{"dest", "images" (written), "skipped", "resolution" (side), "labels" (bool)}``; the
        images are uint8 [side, side, 3] PNGs.
    """
    size = parse_resolution(resolution)
    _check_size(transform, size)
    _check_count("max_images", max_images, none_ok=True)
    dest = _check_dest(dest)
    fn = _TRANSFORM_FNS[transform]
    w, h = size or (None, None)
    with _images(source, max_images) as src, _writer(dest) as write:
        entries, first, shape = [], None, None
        for i in tqdm(range(len(src)), desc="convert", unit="img", disable=not progress):
            img = fn(src.pixels(i), w, h)
            if img is None:
                continue
            if first is None:
                first, shape = i, img.shape
                if shape[0] != shape[1] or not _pow2(shape[0]):
                    raise ValueError(
                        f"{src.path}/{src.names[i]}: images must be square with a power-of-two side, "
                        f"got {shape[1]}x{shape[0]}; give transform= and resolution="
                    )
            elif img.shape != shape:
                raise ValueError(
                    f"{src.path}/{src.names[i]}: image of {img.shape[1]}x{img.shape[0]} after the "
                    f"transform, but {src.names[first]} is {shape[1]}x{shape[0]}: all images must "
                    "have one size (give transform= and resolution=)"
                )
            name = _name(i, "img", "png")
            write(name, _png(img))
            entries.append(None if src.labels[i] is None else [name, src.labels[i]])
        if not entries:
            raise ValueError(f"source {src.path}: no image is large enough for {transform} at {w}x{h}")
        write("dataset.json", _labels_json(entries))
    labelled = all(e is not None for e in entries)
    return dict(
        dest=str(dest),
        images=len(entries),
        skipped=len(src) - len(entries),
        resolution=shape[0],
        labels=labelled,
    )


def encode(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    vae,
    batch: int = 8,
    max_images: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict:
    """Encodes a pixel data set into the VAE posterior's per-image mean and standard deviation,
    as the official ``dataset_tool.py encode`` (``StabilityVAEEncoder.encode_pixels``: the VAE
    sees pixels / 255 in [0, 1], float32).

    Under ``torch.distributed`` (initialised, world > 1) every rank calls this with the same
    arguments: batches are dealt round-robin over the ranks and rank 0 writes ``dest``; the
    result equals a one-process run (the same batches).

    Args:
        source: folder or ``.zip`` of images (a :func:`convert` output), all of one size, taken
            in name order as RGB; labels from its ``dataset.json``.
        dest: a ``.zip`` (replaced if it exists) or a folder (new or empty). Per image ``i``,
            ``{i:08d}[:5]/img-mean-std-{i:08d}.npy``: float32 [2 * C, H / f, W / f] =
            concat(mean, std) over channels; ``dataset.json`` with the labels.
        vae: a local diffusers ``AutoencoderKL`` folder (the layout ``save_pretrained`` writes,
            e.g. stabilityai/sd-vae-ft-mse; never downloaded) or a loaded ``AutoencoderKL``
            (which runs in its own dtype, on its own device).
        batch: images per VAE call (per rank).
        max_images: encode at most this many images (None: all).
        device: where a VAE folder is loaded to run (default: the current CUDA device if any,
            else the CPU); must be None for a loaded VAE.
        progress: show a progress bar (rank 0).

    Returns:
        ``{"dest", "images", "shape" ([2 * C, h, w]), "labels" (bool)}`` on every rank.
    """
    _check_count("batch", batch, none_ok=False)
    _check_count("max_images", max_images, none_ok=True)
    dest = _check_dest(dest)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    with _images(source, max_images) as src:
        model = _vae(vae, device)
        n, shape = len(src), src.pixels(0).shape
        batches = [range(i, min(i + batch, n)) for i in range(0, n, batch)]
        out_shape = None
        with _writer(dest) if rank == 0 else contextlib.nullcontext() as write:
            bar = tqdm(total=n, desc="encode", unit="img", disable=not progress or rank != 0)
            for r in range(0, len(batches), world):  # round r: batch r + k on rank k
                k = r + rank
                mine = _encode_batch(model, src, batches[k], shape) if k < len(batches) else None
                for j, arrays in enumerate(_gather(mine, world, rank), start=r):  # rank 0 writes
                    if arrays is None:  # past the last batch
                        break
                    for i, arr in zip(batches[j], arrays):
                        write(_name(i, "img-mean-std-", "npy"), _npy(arr))
                    out_shape = list(arrays.shape[1:])
                    bar.update(len(arrays))
            bar.close()
            if rank == 0:
                entries = [
                    None if lab is None else [_name(i, "img-mean-std-", "npy"), lab]
                    for i, lab in enumerate(src.labels)
                ]
                write("dataset.json", _labels_json(entries))
        labelled = all(lab is not None for lab in src.labels)
    if world > 1:  # after rank 0 has written dest; every rank returns the same
        box = [out_shape]
        dist.broadcast_object_list(box, src=0)
        out_shape = box[0]
    return dict(dest=str(dest), images=n, shape=out_shape, labels=labelled)


def _vae(vae, device) -> torch.nn.Module:
    if isinstance(vae, torch.nn.Module):
        if device is not None:
            raise ValueError(
                f"device applies to a VAE folder; move a loaded VAE with vae.to({str(device)!r})"
            )
        if not callable(getattr(vae, "encode", None)):
            raise TypeError(f"vae must be a diffusers AutoencoderKL (with .encode), got {type(vae).__name__}")
        return vae
    if not isinstance(vae, (str, os.PathLike)):
        raise TypeError(f"vae must be a VAE folder or a loaded AutoencoderKL, got {type(vae).__name__}")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    return load_vae(vae, device)


def _encode_batch(model: torch.nn.Module, src: _Images, indices: range, shape: tuple) -> np.ndarray:
    # Images [B, 3, H, W] / 255 -> the posterior's concat(mean, std), float32 [B, 2 * C, h, w].
    images = []
    for i in indices:
        img = src.pixels(i)
        if img.shape != shape:
            raise ValueError(
                f"{src.path}/{src.names[i]}: image of {img.shape[1]}x{img.shape[0]}, but {src.names[0]} "
                f"is {shape[1]}x{shape[0]}: all images must have one size"
            )
        images.append(img)
    param = next(model.parameters())
    # NCHW-contiguous, as the official's one image is: a channels-last batch selects other CPU
    # convolution kernels (results differ in the last float32 bits).
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(param.device)
    with torch.no_grad():
        d = model.encode((x.to(torch.float32) / 255).to(param.dtype)).latent_dist
        return torch.cat([d.mean, d.std], dim=1).to(torch.float32).cpu().numpy()


def _gather(mine, world: int, rank: int) -> list:
    # Every rank's batch of this round (None where a rank had none) at rank 0; [] elsewhere.
    if world == 1:
        return [mine]
    got = [None] * world if rank == 0 else None
    dist.gather_object(mine, got, dst=0)
    return got or []


# ---------------------------------------------------------------------------------------------
# Command line: `autoguide dataset convert|encode`.
