"""The official dataset tool's image transforms: uint8 RGB [H, W, 3] -> [height, width, 3], with
the official arithmetic and PIL filters."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image

__all__ = ["TRANSFORMS", "center_crop", "center_crop_dhariwal", "center_crop_wide", "scale"]

# The crop modes of the official tool; None resizes only (to ``resolution`` when given).
TRANSFORMS = ("center-crop", "center-crop-wide", "center-crop-dhariwal")  # None: resize only


def scale(img: np.ndarray, width: int | None, height: int | None) -> np.ndarray:
    """Lanczos resize to width x height (None keeps that side); unchanged when already that size."""
    h, w = img.shape[:2]
    size = (width or w, height or h)
    if size == (w, h):
        return img
    return np.asarray(PIL.Image.fromarray(img).resize(size, PIL.Image.Resampling.LANCZOS))


def center_crop(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """The central square (side min(H, W)), Lanczos-resized to width x height."""
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
    return np.asarray(PIL.Image.fromarray(img).resize((width, height), PIL.Image.Resampling.LANCZOS))


def center_crop_wide(img: np.ndarray, width: int, height: int) -> np.ndarray | None:
    """The central rows of aspect width:height, Lanczos-resized to width x height and centred on a
    black width x width canvas; None (the image is skipped) when narrower than ``width`` or too
    short. The crop height is round(width * H / W) rows of the input, as the official tool counts."""
    h, w = img.shape[:2]
    ch = round(width * h / w)
    if w < width or ch < height:
        return None
    img = img[(h - ch) // 2 : (h + ch) // 2]
    img = np.asarray(PIL.Image.fromarray(img).resize((width, height), PIL.Image.Resampling.LANCZOS))
    canvas = np.zeros([width, width, 3], dtype=np.uint8)
    canvas[(width - height) // 2 : (width + height) // 2] = img
    return canvas


def center_crop_dhariwal(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """ADM's ImageNet crop (Dhariwal & Nichol 2021, guided-diffusion ``center_crop_arr``): halve with
    a box filter while the short side is >= 2 * size, bicubic-resize the short side to size, take
    the central size x size (width == height == size)."""
    size = width
    pil = PIL.Image.fromarray(img)
    while min(pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=PIL.Image.Resampling.BOX)
    k = size / min(pil.size)
    pil = pil.resize(tuple(round(x * k) for x in pil.size), resample=PIL.Image.Resampling.BICUBIC)
    arr = np.asarray(pil)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size]


_TRANSFORM_FNS: dict[str | None, Callable] = {
    None: scale,
    "center-crop": center_crop,
    "center-crop-wide": center_crop_wide,
    "center-crop-dhariwal": center_crop_dhariwal,
}
