"""Power-function EMA (Karras et al. 2024, Section 3); the math lives in the Rust core.

- :func:`std_to_exp`, :func:`exp_to_std`: relative std <-> power-function exponent (Eqs. 123-126).
- :func:`power_function_beta`: per-update decay tracking a profile (Eq. 127).
- :class:`PowerFunctionEMA`: tracks several EMA widths of a network at once during training.
- :func:`solve_coefficients`, :func:`reconstruct`: post-hoc EMA (Algorithm 3): any profile
  from snapshots saved with other profiles, in one streaming pass over memory-mapped files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import _core
from ._core import STD_MAX, exp_to_std, power_function_beta, std_to_exp
from .checkpoint import convert, read_metadata
from .files import remove_stale_temporaries
from .interop.official import is_official_pickle, snapshot_metadata

__all__ = [
    "STD_MAX",
    "PowerFunctionEMA",
    "SnapshotInfo",
    "exp_to_std",
    "list_snapshots",
    "power_function_beta",
    "reconstruct",
    "solve_coefficients",
    "std_to_exp",
]


class PowerFunctionEMA:
    """EMA copies of ``net`` with power-function profiles of relative widths ``stds``.

    Call :meth:`update` after every optimiser step with the training time after the step
    (``t_next``, in images or iterations) and the time the step covered (``t_delta``).
    """

    @torch.no_grad()
    def __init__(self, net: torch.nn.Module, stds: Sequence[float] = (0.050, 0.100)):
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if isinstance(stds, str) or not stds:
            raise ValueError(f"stds must be a non-empty sequence of EMA widths, got {stds!r}")
        self.stds = [float(s) for s in stds]
        for s in self.stds:
            std_to_exp(s)  # raises ValueError naming the bad width
        self.net = net
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]

    @torch.no_grad()
    def update(self, t_next: float, t_delta: float) -> None:
        params = [p.detach() for p in self.net.parameters()]
        for std, ema in zip(self.stds, self.emas):
            beta = power_function_beta(std, float(t_next), float(t_delta))
            ema_params = list(ema.parameters())
            torch._foreach_lerp_(ema_params, params, 1.0 - beta)
            for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
                b_ema.copy_(b_net)


def check_std_names(stds, name: str) -> None:
    """EMA widths name their snapshot files with 3 decimals (``...-0.050``): widths that share a
    name would overwrite each other's files, so they are refused."""
    seen: dict[str, float] = {}
    for s in stds:
        key = f"{float(s):.3f}"
        if key in seen:
            raise ValueError(
                f"{name}: {seen[key]} and {s} both name files '-{key}' (snapshot names keep 3 decimals); "
                "give widths that differ in the first 3 decimals"
            )
        seen[key] = s


def solve_coefficients(in_nimg, in_std, out_nimg, out_std) -> np.ndarray:
    """Post-hoc EMA coefficients ``X`` [in, out] (float64): output profile ``j`` (ending at
    ``out_nimg[j]`` with relative std ``out_std[j]``) is ``sum_i X[i, j] * snapshot_i``; each
    column sums to 1. Scalars broadcast against the other argument of their pair."""
    in_nimg, in_std = np.broadcast_arrays(np.float64(in_nimg), np.float64(in_std))
    out_nimg, out_std = np.broadcast_arrays(np.float64(out_nimg), np.float64(out_std))
    rows = _core.solve_coefficients(
        in_nimg.ravel().tolist(), in_std.ravel().tolist(), out_nimg.ravel().tolist(), out_std.ravel().tolist()
    )
    return np.array(rows, dtype=np.float64).reshape(in_nimg.size, out_nimg.size)


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot file with the training time and EMA width read from its metadata."""

    path: Path
    nimg: int
    std: float


def list_snapshots(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[SnapshotInfo]:
    """Snapshot files of a run directory (or the given files) that carry ``nimg`` and
    ``ema_std`` metadata, sorted by (nimg, std). Training-state checkpoints are skipped. Official
    EDM2 snapshots (``network-snapshot-<kimg>-<std>.pkl``) count too: their name gives both."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(f"snapshots must be a directory of snapshot files, got {root}")
        files = sorted(p for p in root.iterdir() if p.suffix == ".safetensors" or is_official_pickle(p))
    else:
        files = [Path(p) for p in source]
    found = []
    for f in files:
        meta = snapshot_metadata(f) if is_official_pickle(f) else read_metadata(f)
        if "nimg" in meta and "ema_std" in meta:
            found.append(SnapshotInfo(f, int(meta["nimg"]), float(meta["ema_std"])))
    return sorted(found, key=lambda s: (s.nimg, s.std))


# The output dtypes of `reconstruct` (torch dtypes and their names), as safetensors names them.
_OUT_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
}


def reconstruct(
    snapshots: str | os.PathLike | Sequence[str | os.PathLike],
    out_std: float | Sequence[float],
    out_nimg: int | None = None,
    out_dir: str | os.PathLike = "phema",
    *,
    prefix: str = "phema",
    progress: bool = True,
    dtype: torch.dtype | str | None = None,
) -> list[Path]:
    """Reconstructs EMA profiles of widths ``out_std`` at training time ``out_nimg`` (default:
    the newest snapshot) from the snapshots of a run, reading each input once.

    Inputs are the snapshots with ``0 < nimg <= out_nimg`` at a snapshot's time (as the official
    ``reconstruct_phema.py``); any other time up to the newest snapshot also works, from the
    snapshots up to the first one after it. Outputs are network snapshots
    (metadata ``nimg``, ``ema_std``, ``config``...) named
    ``{prefix}-{nimg:09d}-{std:.3f}.safetensors`` in ``out_dir``, loadable with
    ``autoguide_fast.load``. Nothing is written unless every input is valid and consistent.
    Sums run in float32; each tensor is then rounded once (to nearest-even, as
    ``torch.Tensor.to`` rounds) to ``dtype``: ``None`` keeps the dtype of its inputs (float16
    snapshots, as EDM2 saves them, give float16 outputs; float32 where the inputs disagree), or
    ``torch.float32`` / ``torch.float16`` / ``torch.bfloat16`` (or their names) for every
    tensor. Non-float tensors and buffers are copied from the newest input as they are.
    """
    try:
        out_dtype = None if dtype is None else _OUT_DTYPES[dtype]
    except (KeyError, TypeError):
        raise ValueError(
            f"dtype must be None (the inputs' dtype), torch.float32, torch.float16 or torch.bfloat16, "
            f"got {dtype!r}"
        ) from None
    stds = [float(out_std)] if isinstance(out_std, (int, float)) else sorted({float(s) for s in out_std})
    if not stds:
        raise ValueError("out_std must name at least one EMA width")
    for s in stds:
        std_to_exp(s)  # ValueError naming the bad width
    check_std_names(stds, "out_std")
    own = isinstance(snapshots, (str, os.PathLike)) and Path(out_dir).resolve() == Path(snapshots).resolve()
    if out_dir is not None and not own and any(Path(out_dir).glob("training-state-*.safetensors")):
        raise ValueError(
            f"out_dir {out_dir} is a training run's folder: reconstructed profiles there would mix with "
            "its snapshots; give another folder"
        )
    found = list_snapshots(snapshots)
    if not found:
        raise ValueError(f"no snapshots with 'nimg' and 'ema_std' metadata in {snapshots}")
    last = max(s.nimg for s in found)
    out_nimg = last if out_nimg is None else int(out_nimg)
    if not 0 < out_nimg <= last:
        raise ValueError(f"out_nimg must be in (0, {last}] (the newest snapshot), got {out_nimg}")
    # At a snapshot's time, the snapshots up to it (as the official tool); between two snapshot
    # times, those up to the next one: only a profile that reaches past out_nimg can fit the tail
    # of the target profile (the solve is a least-squares fit over the inputs' profiles).
    until = min(s.nimg for s in found if s.nimg >= out_nimg)
    inputs = [s for s in found if 0 < s.nimg <= until]
    coefs = solve_coefficients([s.nimg for s in inputs], [s.std for s in inputs], out_nimg, stds)

    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"prefix must be a plain file-name prefix (letters, digits, '_', '-', '.'), got {prefix!r}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir must be a directory, got the file {out_dir}")
    if any(out_dir.resolve() == s.path.parent.resolve() for s in inputs):
        raise ValueError(f"out_dir must not be the snapshots' directory, got {out_dir}")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)  # of a run that was killed while writing
    try:
        if not any(is_official_pickle(s.path) for s in inputs):
            return _reconstruct(inputs, coefs, stds, out_nimg, out_dir, prefix, progress, out_dtype)
        convert_dir = tempfile.TemporaryDirectory(
            prefix=".phema-convert-", suffix=f".{os.getpid()}.tmp", dir=out_dir
        )
        with convert_dir as tmp:
            inputs = [  # official pickles -> safetensors files the Rust pass maps
                SnapshotInfo(convert(s.path, Path(tmp) / f"{i:05d}.safetensors")[0], s.nimg, s.std)
                if is_official_pickle(s.path)
                else s
                for i, s in enumerate(inputs)
            ]
            return _reconstruct(inputs, coefs, stds, out_nimg, out_dir, prefix, progress, out_dtype)
    except BaseException:
        if created:  # nothing half-made stays behind
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise


_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _reconstruct(inputs, coefs, stds, out_nimg, out_dir, prefix, progress, out_dtype) -> list[Path]:
    metas = {s.path: read_metadata(s.path) for s in inputs}
    for key, what in (("config", "networks"), ("run", "training runs")):
        seen: dict[str, Path] = {}
        for p, m in metas.items():
            if m.get(key) is not None:
                seen.setdefault(m[key], p)
        if len(seen) > 1:
            a, b = (p.name for p in list(seen.values())[:2])
            raise ValueError(f"snapshots of different {what} cannot be combined: {a} and {b} differ in {key}")
    # Every input has the same tensors with the same shapes (the same bytes could hold another
    # shape, and a weighted sum over them would be silently wrong); dtypes may differ.
    layouts = {}
    for s in inputs:
        rows = _core.read_header(s.path)[1]
        layouts[s.path] = {name: tuple(shape) for name, _, shape, _, _ in rows}
    first, want = inputs[0].path, layouts[inputs[0].path]
    for p, layout in layouts.items():
        if layout != want:
            diff = sorted(k for k in layout.keys() | want.keys() if layout.get(k) != want.get(k))
            raise ValueError(
                f"snapshots disagree on tensors {diff[:3]}: {p.name} and {first.name} (shape or dtype)"
            )
    base = read_metadata(inputs[-1].path)
    copy_names = json.loads(base.get("buffers", "[]"))
    posthoc = json.dumps(dict(inputs=len(inputs), in_std=sorted({s.std for s in inputs})))
    outputs = []
    for std in stds:
        meta = dict(base, nimg=str(out_nimg), ema_std=str(std), posthoc=posthoc)
        outputs.append((out_dir / f"{prefix}-{out_nimg:09d}-{std:.3f}.safetensors", meta))
    callback = None
    bar = None
    if progress:
        bar = tqdm(
            total=100,
            desc=f"post-hoc EMA: {len(inputs)} snapshots -> {len(stds)}",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]",  # no rate of "%"
        )

        def callback(done: int, total: int) -> None:
            bar.n = round(100 * done / total)
            bar.refresh()

    try:
        _core.reconstruct([s.path for s in inputs], coefs.tolist(), outputs, copy_names, callback, out_dtype)
    finally:
        if bar is not None:
            bar.close()
    return [p for p, _ in outputs]
