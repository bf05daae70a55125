"""Reference statistics files, in the official layouts.

- ``.pkl`` (NVlabs/edm2 ``calculate_metrics.py ref``, e.g. ``img512.pkl``, ``img64.pkl``): a pickled
  ``{'num_images': N, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {'mu', 'sigma'}}`` of float64 numpy arrays.
  Read with a restricted unpickler (dictionaries and numpy arrays only; anything else is refused
  and nothing is executed); written so that the official tool reads it.
- ``.npz``: EDM1's ``mu`` / ``sigma`` (Inception statistics, read as ``fid``), or this project's
  ``<metric>.mu`` / ``<metric>.sigma`` (+ ``num_images``) for several metrics. A file with FID alone
  is written in EDM1's layout.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from .._core import AutoguideError
from ..data import read_npz
from ..files import atomic_path
from ..interop.official import unpickle

__all__ = ["load_ref", "save_ref"]

METRICS = ("fid", "fd_dinov2")


def _checked(path, stats: dict) -> dict:
    """{metric: {'mu': [D] float64, 'sigma': [D, D] float64}} (+ 'num_images' when known)."""
    out: dict = {}
    for name, entry in stats.items():
        if name == "num_images":
            out[name] = int(entry)
            continue
        if not isinstance(entry, dict) or not {"mu", "sigma"} <= set(entry):
            raise ValueError(f"{path}: '{name}' must hold 'mu' and 'sigma', got {entry!r:.80}")
        mu, sigma = np.asarray(entry["mu"]), np.asarray(entry["sigma"])
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size) or mu.size == 0:
            raise ValueError(f"{path}: '{name}' needs mu [D] and sigma [D, D], got {mu.shape}, {sigma.shape}")
        if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
            raise ValueError(f"{path}: '{name}' statistics must be floats, got {mu.dtype}, {sigma.dtype}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{path}: '{name}' statistics hold NaN or inf")
        out[name] = {"mu": mu.astype(np.float64), "sigma": sigma.astype(np.float64)}
    if not any(k != "num_images" for k in out):
        raise ValueError(f"{path}: holds no statistics (expected {' / '.join(METRICS)})")
    return out


def load_ref(path: str | os.PathLike) -> dict:
    """Reference statistics ``{metric: {'mu': [D], 'sigma': [D, D]}}`` (float64 numpy arrays; the
    metrics present in the file, and ``num_images`` where the file has it) from an official
    ``.pkl``, an EDM1 ``.npz`` (``mu``, ``sigma``: ``fid``) or a file :func:`save_ref` wrote."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    if path.suffix.lower() == ".npz":
        arrays, names = read_npz(path, ())
        arrays, _ = read_npz(path, tuple(names))
        if {"mu", "sigma"} <= set(names):
            return _checked(path, {"fid": {"mu": arrays["mu"], "sigma": arrays["sigma"]}})
        stats: dict = {}
        for key, value in arrays.items():
            metric, _, field = key.rpartition(".")
            if key == "num_images":
                stats["num_images"] = int(value)
            elif metric and field in ("mu", "sigma"):
                stats.setdefault(metric, {})[field] = value
        return _checked(path, stats)
    try:
        data = unpickle(path, arrays_only=True)
    except AutoguideError as e:
        raise AutoguideError(f"{e} (reference statistics are read as data only)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: reference statistics must be a dict, got {type(data).__name__}")
    return _checked(path, {k: v for k, v in data.items() if k in (*METRICS, "num_images")})


def save_ref(stats: dict, path: str | os.PathLike) -> Path:
    """Writes ``{metric: {'mu', 'sigma'}, 'num_images': N}`` atomically: ``.pkl`` in the official
    layout (a plain pickle of dicts and float64 numpy arrays, protocol 4), ``.npz`` as described in
    the module. Returns the path."""
    path = Path(path)
    stats = _checked(path, stats)
    suffix = path.suffix.lower()
    if suffix not in (".pkl", ".npz"):
        raise ValueError(f"reference statistics are written as .pkl or .npz, got {path}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if suffix == ".pkl":
            pickle.dump(stats, f, protocol=4)
        elif set(stats) - {"num_images"} == {"fid"}:
            np.savez(f, mu=stats["fid"]["mu"], sigma=stats["fid"]["sigma"])
        else:
            flat = {f"{m}.{k}": v for m, e in stats.items() if m != "num_images" for k, v in e.items()}
            if "num_images" in stats:
                flat["num_images"] = np.int64(stats["num_images"])
            np.savez(f, **flat)
    return path
