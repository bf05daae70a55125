"""Network snapshots as safetensors files: tensors plus string metadata holding the architecture
name and its constructor arguments (JSON), so :func:`load` rebuilds a ready denoiser. Nothing
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

__all__ = ["atomic_write_bytes", "load", "read_metadata", "save"]


def _architectures() -> dict[str, type[torch.nn.Module]]:
    from .networks.toy import ToyModel

    return {"toy": ToyModel}


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


def save(module: torch.nn.Module, path: str | os.PathLike, **metadata) -> None:
    """Saves ``module``'s state dict and config to ``path`` (safetensors). Extra ``metadata``
    values are stored as strings (non-strings as JSON)."""
    arch = _arch_name(module)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta.update(arch=arch, config=json.dumps(module.config))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, st_save(tensors, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a snapshot file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot file at {path}")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load(path: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuilds the network saved at ``path`` in eval mode, without gradients."""
    meta = read_metadata(path)
    archs = _architectures()
    if meta.get("arch") not in archs or "config" not in meta:
        raise ValueError(f"{path} is not an autoguide_fast snapshot (metadata 'arch' and 'config' missing)")
    net = archs[meta["arch"]](**json.loads(meta["config"]))
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    net.load_state_dict(state)
    return net.to(device).eval().requires_grad_(False)
