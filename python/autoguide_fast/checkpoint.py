"""Snapshots as standard safetensors files. :func:`save` / :func:`load` move plain tensors;
:func:`save_network` / :func:`load_network` (``autoguide_fast.save`` / ``load``) add string
metadata with the architecture name and its constructor arguments (JSON), so that a ready
denoiser can be rebuilt. Nothing
is unpickled; writes are atomic (temporary file, fsync, rename), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

__all__ = ["atomic_write_bytes", "load", "load_network", "read_metadata", "save", "save_network"]


def _architectures() -> dict[str, type[torch.nn.Module]]:
    from .networks.edm2 import Precond
    from .networks.toy import ToyModel

    return {"edm2": Precond, "toy": ToyModel}


def _arch_name(module: torch.nn.Module) -> str:
    for name, cls in _architectures().items():
        if type(module) is cls:
            return name
    raise TypeError(f"module must be one of {sorted(_architectures())} networks, got {type(module).__name__}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same directory, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Writes ``tensors`` (name -> CPU-copyable tensor) and string ``metadata`` as a standard
    safetensors file, atomically."""
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("metadata must map str to str")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot file at {path}")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot file at {path}")
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def save_network(module: torch.nn.Module, path: str | os.PathLike, **metadata) -> None:
    """Saves one of the package's networks with its architecture and constructor arguments, so
    that :func:`load_network` rebuilds it. Extra ``metadata`` values are stored as strings
    (non-strings as JSON). Exported as ``autoguide_fast.save``."""
    arch = _arch_name(module)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.update(arch=arch, config=json.dumps(module.config))
    save(module.state_dict(), path, meta)


def load_network(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuilds the network saved at ``path`` in eval mode, without gradients. Exported as
    ``autoguide_fast.load``."""
    meta = read_metadata(path)
    archs = _architectures()
    if meta.get("arch") not in archs or "config" not in meta:
        raise ValueError(
            f"{path} is not an autoguide_fast network snapshot (metadata 'arch' and 'config' missing)"
        )
    net = archs[meta["arch"]](**json.loads(meta["config"]))
    net.load_state_dict(load(path, device))
    return net.to(device).eval().requires_grad_(False)
