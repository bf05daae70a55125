"""Images in and out: uint8 <-> [-1, 1] float, PNG decoding (with text chunks) and image grids."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .files import atomic_path

__all__ = ["read_png", "save_grid", "to_float", "to_uint8"]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (inverse of :func:`to_uint8` up to rounding)."""
    return images.to(torch.float32) / 127.5 - 1


def read_png(data: bytes, name: str) -> tuple[np.ndarray, dict[str, str]]:
    """A PNG file's bytes -> uint8 [H, W, C] (palette images as RGB/RGBA) and its text chunks;
    ValueError naming ``name`` when it is not a readable 8-bit image."""
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


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images [N, C, H, W] -> uint8 (EDM rounding)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def save_grid(
    images: torch.Tensor, path: str | os.PathLike, columns: int | None = None, pad: int = 1
) -> None:
    """Writes uint8 images [N, C, H, W] as one PNG grid with ``pad``-pixel grey separators
    (nearest-neighbour upscaled when tiny)."""
    n, c, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 96, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = images[i].permute(1, 2, 0)
    arr = grid.numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
    scale = max(1, 256 // max(h, w))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, "PNG")
