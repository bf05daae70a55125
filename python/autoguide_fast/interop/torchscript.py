"""The tensors of a TorchScript archive (``torch.jit.save``), read without loading or running its
code: ``data.pkl`` goes through a restricted unpickler (the scripted classes become
:class:`~autoguide_fast.interop.official.Record` data, tensors are rebuilt from the archive's
storage entries), ``code/`` is never read. Used for NVIDIA's ``inception-2015-12-05.pt``."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from pathlib import Path

import torch

from .._core import AutoguideError
from .official import Record, _rebuild_tensor

__all__ = ["is_torchscript", "read_tensors"]

# torch.<Name>Storage as pickled in archives -> dtype.
_STORAGES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Storage:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _scripted_class(qualname: str) -> type:
    class Scripted(Record):
        def __new__(cls, *args):
            if args:
                raise pickle.UnpicklingError(f"{qualname} with constructor arguments")
            return Record(qualname)

    return Scripted


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _scripted_class(f"{module}.{name}")
        if module == "torch" and name in _STORAGES:
            return _Storage(_STORAGES[name])
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise AutoguideError(
            f"{self._path}: refused to load: the archive's data names the global {module}.{name}, "
            "which a TorchScript module's data does not use (nothing was executed)"
        )

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, numel): the bytes of data/<key>.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r:.60}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _Storage) or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError("malformed storage record")
        data = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
        itemsize = torch.empty((), dtype=kind.dtype).element_size()
        if len(data) != numel * itemsize:
            raise pickle.UnpicklingError(f"storage {key}: {len(data)} bytes for {numel} elements")
        return kind.dtype, torch.frombuffer(data, dtype=torch.uint8).untyped_storage()


def is_torchscript(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip archive with a TorchScript ``code/`` folder and ``data.pkl``."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)


def _walk(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, Record):
        for name, value in obj.state.items():
            if isinstance(name, str):
                _walk(value, f"{prefix}{name}.", out)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the scripted module tree, by dotted name (``layers.conv.weight``)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            data = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(data) != 1:
                raise AutoguideError(f"{path}: not a TorchScript archive (no single <name>/data.pkl)")
            prefix = data[0][: -len("data.pkl")]
            order = (
                z.read(f"{prefix}byteorder").decode() if f"{prefix}byteorder" in z.namelist() else "little"
            )
            if order.strip() != "little":
                raise AutoguideError(f"{path}: big-endian archives are not supported")
            with z.open(data[0]) as f:
                root = _Unpickler(f, z, prefix, path).load()
    except AutoguideError:
        raise
    except (zipfile.BadZipFile, EOFError, KeyError, pickle.UnpicklingError, ValueError, RuntimeError) as e:
        raise AutoguideError(f"{path}: not a readable TorchScript archive ({e})") from None
    out: dict[str, torch.Tensor] = {}
    _walk(root, "", out)
    return out
