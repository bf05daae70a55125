"""Snapshots as standard safetensors files, through the Rust store (memory-mapped reads with full
header validation, atomic writes). Nothing is ever unpickled.

- :func:`save` / :func:`load` / :func:`open`: plain tensors and string metadata.
- :func:`save_network` / :func:`load_network` (``autoguide_fast.save`` / ``load``): one of the
  package's networks, with its architecture name and constructor arguments (JSON) in the
  metadata, so that a ready denoiser can be rebuilt.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import mmap
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from . import _core

__all__ = [
    "Snapshot",
    "atomic_path",
    "atomic_write_bytes",
    "load",
    "load_network",
    "open",
    "read_metadata",
    "save",
    "save_network",
]

_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}  # fmt: skip
_FROM_ST = {v: k for k, v in _TO_ST.items()}


def check_regular_file(path: Path) -> None:
    """Raises FileNotFoundError, IsADirectoryError, or AutoguideError when ``path`` is not a
    regular file (a FIFO or device would block or be clobbered): every reader checks first."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise _core.AutoguideError(f"{path} is not a regular file (a pipe, socket or device); refused")


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
        if torch.device(device).type == "cpu":
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable(path: Path) -> None:
    """Raises unless ``path`` is absent or a regular file (a device, FIFO or directory is never
    replaced by a write)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path} is a directory; refusing to write over it")
    if not stat.S_ISREG(st.st_mode):
        raise _core.AutoguideError(
            f"{path} is not a regular file (a pipe, socket or device); refusing to replace it"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """The one way the package writes a file: yields a temporary path in the destination's
    directory (``.<name>.<random>.<pid>.tmp``); when the block succeeds the file is fsynced, given
    the mode the umask allows, and renamed over ``path``; when it fails the temporary is removed.
    A crash leaves the old file or the new one, never half of one, and :func:`remove_stale_temporaries`
    recognises the temporaries of a dead process. ``fsync=False`` (many small files that can be
    made again, e.g. generated images) keeps the rename's atomicity against a dying process but
    not against a power failure."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with builtins.open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, rect=None) -> None:
    """Lays out a matplotlib figure (``tight_layout``, within ``rect`` if given), writes it
    atomically to ``path`` in the format its suffix names (PNG without one) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout(**({} if rect is None else dict(rect=rect)))
    try:
        with atomic_path(path) as tmp:  # the temporary ends in .tmp: name the format
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=dpi)
    finally:
        plt.close(fig)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def strict_json(value, **kwargs) -> str:
    """JSON that other tools read: infinities become null (e.g. an open guidance interval); NaN
    is refused."""

    def clean(v):
        if isinstance(v, float) and math.isinf(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **kwargs)


def file_identity(path: str | os.PathLike) -> list:
    """[name, size, modification time in ns]: what cell caches key a file on (a changed file is
    another file)."""
    p = Path(path)
    st = p.stat()
    return [p.name, st.st_size, st.st_mtime_ns]


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Removes the temporaries (``.<name>.<pid>.tmp``, files or folders) that writers of this
    package left in ``directory`` when their process died; those of live processes stay."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(".*.tmp"):
        pid = p.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _architectures() -> dict[str, type[torch.nn.Module]]:
    from .networks.edm2 import Precond
    from .networks.toy import ToyModel

    return {"edm2": Precond, "toy": ToyModel}


def _arch_name(module: torch.nn.Module) -> str:
    for name, cls in _architectures().items():
        if type(module) is cls:
            return name
    raise TypeError(f"module must be one of {sorted(_architectures())} networks, got {type(module).__name__}")


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
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64}  # fmt: skip
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
    from .interop.official import is_official_pickle, read
    from .interop.vae import EncoderInfo

    dtype = _cast(dtype)
    if is_official_pickle(path):
        official = read(path, dtype)
        net, encoder = official.net, official.encoder
    else:
        with Snapshot(path) as snap:
            archs = _architectures()
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
