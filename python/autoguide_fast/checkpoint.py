"""Snapshots as standard safetensors files, through the Rust store (memory-mapped reads with full
header validation, atomic writes). Nothing is ever unpickled.

- :func:`save` / :func:`load` / :func:`open`: plain tensors and string metadata.
- :func:`save_network` / :func:`load_network` (``autoguide_fast.save`` / ``load``): one of the
  package's networks, with its architecture name and constructor arguments (JSON) in the
  metadata, so that a ready denoiser can be rebuilt; :func:`load_network` also reads official
  EDM2 pickles (safely), and :func:`convert` turns them into snapshots.

How files are written (atomically) and checked lives in :mod:`autoguide_fast.files`.
"""

from __future__ import annotations

import builtins
import json
import mmap
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from . import _core, checks
from ._core import AutoguideError
from .files import check_regular_file, check_replaceable
from .interop.official import is_official_pickle, read, snapshot_metadata
from .interop.vae import EncoderInfo
from .networks.edm2 import Precond
from .networks.toy import ToyModel

__all__ = [
    "Snapshot",
    "convert",
    "load",
    "load_network",
    "open",
    "read_metadata",
    "save",
    "save_network",
]

_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
_FROM_ST = {v: k for k, v in _TO_ST.items()}


class Snapshot(Mapping[str, torch.Tensor]):
    """A validated safetensors file, memory-mapped. ``snap[name]`` is a zero-copy CPU tensor
    (copy-on-write: writing to it never changes the file), read lazily on first touch.

    Attributes:
        path: the file.
        metadata: its string metadata.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        check_regular_file(self.path)
        for _attempt in range(3):
            with builtins.open(self.path, "rb") as f:
                before = os.fstat(f.fileno())
                if before.st_size == 0:
                    raise _core.AutoguideError(
                        f"{self.path}: not a valid safetensors file: the file is empty"
                    )
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            metadata, rows = _core.read_header(self.path)
            now = os.stat(self.path)
            # The header was validated on the file we mapped, not on one renamed over it since.
            if (now.st_ino, now.st_size, now.st_mtime_ns) == (
                before.st_ino,
                before.st_size,
                before.st_mtime_ns,
            ):
                break
            self._map.close()
        else:
            raise OSError(f"{self.path}: the file kept changing while it was being opened")
        self.metadata: dict[str, str] = dict(metadata)
        self._entries = {name: (dtype, shape, begin, end) for name, dtype, shape, begin, end in rows}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise KeyError(f"{self.path} has no tensor named {name!r}")
        dtype_name, shape, begin, end = self._entries[name]
        if dtype_name not in _FROM_ST:
            raise _core.AutoguideError(
                f"{self.path}: tensor {name!r} has dtype {dtype_name}, which torch cannot hold"
            )
        dtype = _FROM_ST[dtype_name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        count = (end - begin) // itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        if begin % itemsize:  # misaligned for its dtype: copy rather than view
            return torch.frombuffer(bytearray(self._map[begin:end]), dtype=dtype).reshape(shape)
        # Through a memoryview: the tensor holds an export of the map, so close() cannot unmap
        # memory a live tensor still reads (frombuffer on the map itself would not prevent it).
        return torch.frombuffer(memoryview(self._map)[begin:end], dtype=dtype).reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Unmaps the file, unless tensors of it are still alive (they keep the map)."""
        try:
            self._map.close()
        except BufferError:
            pass

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str | os.PathLike) -> Snapshot:  # noqa: A001 - mirrors safetensors.safe_open
    """Memory-maps and validates the safetensors file at ``path``. Raises FileNotFoundError, or
    AutoguideError naming the file when it is damaged or not a safetensors file."""
    return Snapshot(path)


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, as copies in memory on ``device``: they stay valid and
    unchanged whatever later happens to the file (use :class:`Snapshot` for zero-copy reads
    within a scope)."""
    with Snapshot(path) as snap:
        if checks.device("device", device).type == "cpu":
            return {k: v.clone() for k, v in snap.items()}
        return {k: v.to(device) for k, v in snap.items()}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (validated like :func:`open`)."""
    return dict(_core.read_header(Path(path))[0])


def save(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    """Writes ``tensors`` and string ``metadata`` as a standard safetensors file, atomically
    (temporary file in the same directory, fsync, rename): never a half-written file under the
    final name. Tensors on other devices are copied to the CPU first."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to tensors, got {type(tensors)}")
    if "__metadata__" in tensors:
        raise ValueError("tensor name '__metadata__' is reserved by the safetensors format")
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str")
    rows, keep = [], []
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must map str to torch.Tensor, got {name!r}: {type(t)}")
        if t.dtype not in _TO_ST:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        c = t.detach().to("cpu").contiguous()
        keep.append(c)  # every buffer stays alive while the Rust store reads it
        rows.append((name, _TO_ST[c.dtype], list(c.shape), c.data_ptr(), c.numel() * c.element_size()))
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path must be a file path, got the directory {path}")
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _core.write_snapshot(path, rows, metadata)
    del keep


_ARCHITECTURES: dict[str, type[torch.nn.Module]] = {"edm2": Precond, "toy": ToyModel}


def _arch_name(module: torch.nn.Module) -> str:
    for name, cls in _ARCHITECTURES.items():
        if type(module) is cls:
            return name
    raise TypeError(f"module must be one of {sorted(_ARCHITECTURES)} networks, got {type(module).__name__}")


def save_network(
    module: torch.nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = None, **metadata
) -> None:
    """Saves one of the package's networks with its architecture and constructor arguments, so
    that :func:`load_network` rebuilds it (tensors in their dtype, or floating-point ones cast to
    ``dtype``; the network's ``encoder``, if any, is kept). Extra ``metadata`` values are stored
    as strings (non-strings as JSON). Exported as ``autoguide_fast.save``."""
    arch = _arch_name(module)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    buffers = sorted(name for name, _ in module.named_buffers())
    meta.update(arch=arch, config=json.dumps(module.config), buffers=json.dumps(buffers))
    if getattr(module, "encoder", None) is not None:
        meta["encoder"] = module.encoder.to_json()
    state = module.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save(state, path, meta)


def _cast(dtype):
    if dtype is None:
        return None
    names = {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
    }
    dtype = names.get(dtype, dtype)
    if dtype not in names.values():
        raise ValueError(f"dtype must be None or one of {sorted(names)}, got {dtype!r}")
    return dtype


def load_network(
    path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None
) -> torch.nn.Module:
    """Rebuilds the network saved at ``path`` in eval mode, without gradients. Exported as
    ``autoguide_fast.load``.

    Args:
        path: a network snapshot (``.safetensors``), or an official EDM2 pickle (``.pkl``), read by
            the restricted reader of :mod:`autoguide_fast.interop.official` (nothing is executed).
        device: where the network goes.
        dtype: None keeps the stored dtype of every tensor (float16 as EDM2 publishes its models,
            computing as the official code does); a float dtype casts the floating-point tensors.

    The network's ``encoder`` attribute (an :class:`~autoguide_fast.interop.vae.EncoderInfo` or
    None) says how its samples become pixels.
    """
    device = checks.device("device", device)  # before any reading
    dtype = _cast(dtype)
    if is_official_pickle(path):
        official = read(path, dtype)
        net, encoder = official.net, official.encoder
    else:
        with Snapshot(path) as snap:
            archs = _ARCHITECTURES
            if snap.metadata.get("arch") not in archs or "config" not in snap.metadata:
                raise ValueError(
                    f"{path} is not an autoguide_fast network snapshot (metadata 'arch' and 'config' missing)"
                )
            try:
                config = json.loads(snap.metadata["config"])
                with torch.device("meta"):
                    net = archs[snap.metadata["arch"]](**config)
                encoder = (
                    EncoderInfo.from_json(snap.metadata["encoder"]) if "encoder" in snap.metadata else None
                )
                expected = net.state_dict()
                for k, v in snap.items():  # a float weight stored as integers would load silently
                    if k in expected and expected[k].is_floating_point() != v.is_floating_point():
                        raise ValueError(
                            f"tensor {k!r} is stored as {v.dtype}, the network needs a float tensor"
                        )
                # Copies in memory, never views of the mapped file: a network a user holds must not
                # change when the file is rewritten, nor fault (SIGBUS) when it is truncated.
                tensors = {
                    k: v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
                    for k, v in snap.items()
                }
                # assign: the network takes the stored tensors (and dtypes) as they are.
                net.load_state_dict(tensors, assign=True)
            except (ValueError, TypeError, KeyError, RuntimeError) as e:
                raise ValueError(f"{path}: the snapshot does not rebuild its network: {e}") from None
    for name, t in net.state_dict().items():  # NaN weights would make black images, silently
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{path}: tensor {name!r} holds non-finite values (NaN or inf); refusing to use it"
            )
    net.encoder = encoder
    return net.to(device).eval().requires_grad_(False)


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> list[Path]:
    """Official pickle(s) -> network snapshot(s) that :func:`autoguide_fast.load` reads.

    ``src`` is one ``.pkl`` (``dst`` is then the output file, or a directory to put it in) or a
    directory of them (``dst`` a directory; every ``*.pkl`` is converted, nothing is written unless
    all of them read). Tensors keep their stored dtype (float16 as published, bit for bit); the
    metadata holds the network config, the encoder description, the source file name and, for
    official names ``<prefix>-<kimg>-<std>.pkl``, ``nimg`` and ``ema_std``. Writes are atomic.
    Returns the written paths.
    """
    src, dst = Path(src), Path(dst)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if is_official_pickle(p))
        if not files:
            raise ValueError(f"src: no official pickles (*.pkl) in {src}")
        if dst.exists() and not dst.is_dir():
            raise ValueError(f"out must be a directory when src is one, got the file {dst}")
        targets = [dst / f"{p.stem}.safetensors" for p in files]
    else:
        if not is_official_pickle(src):
            raise ValueError(f"src must be an official EDM2 pickle (.pkl) or a directory of them, got {src}")
        files = [src]
        targets = [dst / f"{src.stem}.safetensors" if dst.is_dir() else dst]
    if any(t.resolve() == f.resolve() for t, f in zip(targets, files)):
        raise ValueError(f"out must differ from src, got {dst}")
    checkpoints = [read(f) for f in files]  # everything is read (and checked) before writing
    for ck in checkpoints:  # NaN weights or encoder scales would make black images, silently
        bad = [
            k
            for k, t in ck.net.state_dict().items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if ck.encoder is not None and ck.encoder.scale is not None:
            bad += ["encoder scale/bias"] * (not np.isfinite([*ck.encoder.scale, *ck.encoder.bias]).all())
        if bad:
            raise AutoguideError(
                f"{ck.path}: non-finite values (NaN or inf) in {bad[:3]}; nothing was written"
            )
    for ck, target in zip(checkpoints, targets):
        meta = dict(snapshot_metadata(ck.path), source=ck.path.name, cond=json.dumps(ck.net.label_dim > 0))
        net = ck.net
        net.encoder = ck.encoder
        save_network(net, target, **meta)
    return targets
