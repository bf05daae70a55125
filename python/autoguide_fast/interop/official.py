"""Official EDM2 pickles (NVlabs/edm2: ``training_loop.py``, ``reconstruct_phema.py``, the published
models), read without executing anything.

Every class in those files is a ``torch_utils.persistence`` record that carries the source code of
its module; the official loader executes that code, and ``pickle.load`` would also call any other
global the file names. Here a restricted unpickler resolves an allow-list of globals only:

- the persistence reconstruction function -> a :class:`Record` (class name and state; the embedded
  ``module_src`` is never executed, compiled or imported),
- ``dnnlib.util.EasyDict`` and ``collections.OrderedDict`` -> plain dictionaries, torch's module
  containers (``ModuleDict``...) -> a :class:`Record`,
- the torch tensor and storage rebuild functions of plain-pickled tensors (storage bytes read with
  ``torch.load(weights_only=True)``),
- numpy's array, dtype and scalar reconstruction (no object arrays).

Any other global is refused with an :class:`~autoguide_fast.AutoguideError` naming the file and the
global. :func:`read` turns the records into the project's objects: ``training.networks_edm2.Precond``
-> :class:`~autoguide_fast.networks.Precond` (tensors in their stored dtype), the encoders -> an
:class:`~autoguide_fast.interop.vae.EncoderInfo`; everything else in the file is ignored.
"""

from __future__ import annotations

import collections
import inspect
import io
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._core import AutoguideError
from ..files import check_regular_file
from ..networks.edm2 import Precond
from .presets import official_nimg, parse_official_name
from .vae import EncoderInfo

__all__ = [
    "OfficialCheckpoint",
    "Record",
    "is_official_pickle",
    "read",
    "snapshot_metadata",
    "unpickle",
]

PICKLE_SUFFIXES = (".pkl", ".pickle")


@dataclass
class Record:
    """A pickled object rebuilt as data: its class name and its state (``__dict__``)."""

    class_name: str
    state: dict = field(default_factory=dict)

    def __setstate__(self, state) -> None:  # BUILD on a torch container (ModuleDict...)
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.class_name}: state must be a dict, got {type(state)}")
        self.state = state


class EasyDict(dict):
    """``dnnlib.util.EasyDict`` as a plain dictionary (BUILD with attributes is refused)."""

    def __setstate__(self, state) -> None:
        if state:
            raise pickle.UnpicklingError("EasyDict with instance attributes is not an official file")


def _persistent_record(meta) -> Record:
    # torch_utils.persistence._reconstruct_persistent_obj(meta): meta holds type, version,
    # module_src, class_name and state. module_src is dropped unread.
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise pickle.UnpicklingError("persistence record without type 'class'")
    name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(name, str) or not isinstance(state, dict):
        raise pickle.UnpicklingError("persistence record without class_name and state")
    return Record(name, dict(state))


def _container(qualname: str) -> type:
    # torch.nn containers are pickled with NEWOBJ (cls.__new__(cls)) and BUILD (their __dict__).
    class Container(Record):
        def __new__(cls, *args):
            if args:
                raise pickle.UnpicklingError(f"{qualname} with constructor arguments")
            return Record(qualname)

    return Container


def _storage_from_bytes(data) -> tuple[torch.dtype | None, torch.UntypedStorage]:
    # torch.storage._load_from_bytes: a legacy torch.save of one storage; weights-only loader.
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("storage bytes expected")
    with warnings.catch_warnings():  # "TypedStorage is deprecated": it is what these files hold
        warnings.simplefilter("ignore", UserWarning)
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        if isinstance(storage, torch.TypedStorage):
            return storage.dtype, storage.untyped()
    if not isinstance(storage, torch.UntypedStorage):
        raise pickle.UnpicklingError(f"storage expected, got {type(storage).__name__}")
    return None, storage


def _rebuild_tensor(storage, offset, size, stride, *_rest) -> torch.Tensor:
    # torch._utils._rebuild_tensor_v2 / _v3: a view into a storage; torch checks the bounds.
    if not (isinstance(storage, tuple) and isinstance(storage[1], torch.UntypedStorage)):
        raise pickle.UnpicklingError("tensor without a storage")
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)):
        raise pickle.UnpicklingError("tensor with malformed offset, size or stride")
    dtype, storage = storage
    if dtype is None and len(_rest) >= 3 and isinstance(_rest[2], torch.dtype):
        # _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, ...): the
        # dtype is its 7th argument, for a storage that carries none (an untyped one).
        dtype = _rest[2]
    if dtype is None:
        raise pickle.UnpicklingError("tensor of unknown dtype")
    return torch.empty((0,), dtype=dtype).set_(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, *_rest) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without a tensor")
    return data


def _np_dtype(obj, align=False, copy=False) -> np.dtype:
    if not isinstance(obj, str):
        raise pickle.UnpicklingError("numpy dtype must be named by a string")
    dtype = np.dtype(obj)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy dtype {obj!r} holds Python objects")
    return dtype


def _ndarray(*args, **kwargs):
    # numpy.ndarray as pickles name it: only as the class argument of _reconstruct. Called
    # directly (ndarray(shape, 'O')) it would make an array of Python objects.
    raise pickle.UnpicklingError("numpy.ndarray called directly (only numpy's own array pickling is read)")


def _np_reconstruct(cls, shape, typecode) -> np.ndarray:
    # numpy's ndarray.__reduce__: an empty array that BUILD fills from raw bytes.
    if cls is not _ndarray:
        raise pickle.UnpicklingError("numpy _reconstruct of a class other than ndarray")
    if not isinstance(typecode, (str, bytes)) or np.dtype(typecode).hasobject:
        raise pickle.UnpicklingError("numpy _reconstruct of an array of Python objects")
    return np.ndarray.__new__(np.ndarray, shape, typecode)


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar must be a plain dtype with raw bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_NP_CORE = ("numpy._core.multiarray", "numpy.core.multiarray")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_record,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _np_dtype,
    **{(m, "_reconstruct"): _np_reconstruct for m in _NP_CORE},
    **{(m, "scalar"): _np_scalar for m in _NP_CORE},
    **{
        ("torch.nn.modules.container", n): _container(f"torch.nn.modules.container.{n}")
        for n in ("ModuleDict", "ModuleList", "Sequential")
    },
}


def _np_frombuffer(buf, dtype, shape, order="C") -> np.ndarray:
    # numpy's ndarray.__reduce_ex__ for pickle protocol 5: the raw bytes in band.
    if not isinstance(buf, (bytes, bytearray)) or not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("numpy _frombuffer needs raw bytes and a plain dtype")
    if not isinstance(shape, tuple) or order not in ("C", "F"):
        raise pickle.UnpicklingError("numpy _frombuffer with a malformed shape or order")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


def _latin1_bytes(text, encoding="latin1") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode other than str -> latin1 bytes")
    return text.encode("latin1")


# Data pickles (metric reference statistics): dictionaries of numpy arrays, nothing else.
_ARRAYS: dict[tuple[str, str], Any] = {
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "ndarray"): _ndarray,
    ("numpy", "dtype"): _np_dtype,
    **{(m, "_reconstruct"): _np_reconstruct for m in _NP_CORE},
    **{(m, "scalar"): _np_scalar for m in _NP_CORE},
    **{(m, "_frombuffer"): _np_frombuffer for m in ("numpy._core.numeric", "numpy.core.numeric")},
    ("_codecs", "encode"): _latin1_bytes,
}


class _Unpickler(pickle.Unpickler):
    """Resolves an allow-list only; ``persistent_load`` is unsupported (the base class refuses)."""

    def __init__(self, file, path: str, allowed=None, kind: str = "an official EDM2 checkpoint"):
        super().__init__(file)
        self._path, self._allowed, self._kind = path, _ALLOWED if allowed is None else allowed, kind

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise AutoguideError(
                f"{self._path}: refused to load: the pickle names the global {module}.{name}, which "
                f"{self._kind} does not use (nothing was executed)"
            ) from None


def unpickle(path: str | os.PathLike, *, arrays_only: bool = False) -> Any:
    """The contents of an official EDM2 pickle as data (:class:`Record` objects for persistent
    classes and torch modules), executing nothing. Raises FileNotFoundError, or AutoguideError
    naming the file when it is not a pickle, is truncated, or names a global outside the allow-list.
    ``arrays_only``: a data pickle (dictionaries of numpy arrays, e.g. the official metric reference
    statistics); any class or tensor is refused."""
    path = Path(path)
    check_regular_file(path)
    with open(path, "rb", buffering=1 << 20) as f:  # streamed: peak memory is the tensors, once
        head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            raise AutoguideError(
                f"{path}: this is a torch.save archive, not an official EDM2 pickle; it is not loaded "
                "(only safetensors files and official EDM2 pickles are read)"
            )
        if not head.startswith(b"\x80"):
            raise AutoguideError(f"{path}: not an official EDM2 pickle (no pickle protocol header)")
        f.seek(0)
        try:
            if arrays_only:
                return _Unpickler(f, str(path), _ARRAYS, "a file of numpy arrays").load()
            return _Unpickler(f, str(path)).load()
        except AutoguideError:
            raise
        except EOFError:
            raise AutoguideError(f"{path}: the pickle is truncated") from None
        except pickle.UnpicklingError as e:
            raise AutoguideError(f"{path}: not a readable official EDM2 pickle: {e}") from None
        except Exception as e:  # malformed opcode stream, bad tensor bounds, ...
            raise AutoguideError(f"{path}: not a readable official EDM2 pickle: {e}") from None


def is_official_pickle(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a pickle by its extension (``.pkl``, ``.pickle``)."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


# ---------------------------------------------------------------------------------------------
# Records -> the project's objects.


# Pickles can share objects: a graph of n nodes may hold 2^n paths ("billion laughs"). Every walk
# over pickled data visits each object once, refuses one reached again, and bounds depth and size.
_MAX_DEPTH, _MAX_NODES = 64, 1_000_000


class _Walk:
    def __init__(self):
        self.seen: set[int] = set()

    def visit(self, obj, where: str, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise ValueError(f"{where}: nested more than {_MAX_DEPTH} levels deep")
        if id(obj) in self.seen:
            raise ValueError(f"{where}: an object reached twice (shared references are not official data)")
        self.seen.add(id(obj))
        if len(self.seen) > _MAX_NODES:
            raise ValueError(f"more than {_MAX_NODES} objects to read")


def _module_tensors(
    rec: Record, prefix: str, out: dict[str, torch.Tensor], walk: _Walk | None = None
) -> None:
    """The state dict of a pickled torch module record (parameters and persistent buffers)."""
    walk = walk or _Walk()
    walk.visit(rec, f"module {prefix or '(root)'}", prefix.count("."))
    st = rec.state
    skip = st.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, t in (st.get(group) or {}).items():
            if t is None or (group == "_buffers" and name in skip):
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{prefix}{name} is not a tensor")
            out[prefix + name] = t
    for name, child in (st.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, Record):
            raise ValueError(f"submodule {prefix}{name} is not a module")
        _module_tensors(child, f"{prefix}{name}.", out, walk)


def _init_arguments(rec: Record) -> dict:
    args, kwargs = rec.state.get("_init_args") or (), rec.state.get("_init_kwargs") or {}
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise ValueError("constructor arguments (_init_args, _init_kwargs) are malformed")
    try:
        bound = inspect.signature(Precond).bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"constructor arguments do not fit Precond: {e}") from None
    config = dict(bound.arguments)
    config.update(config.pop("unet_kwargs", {}))
    return _plain(config, _Walk(), 0)


def _plain(v, walk: _Walk, depth: int):
    # JSON-able copies of constructor arguments (EasyDict, tuples, numpy scalars), each container
    # visited once.
    if isinstance(v, (dict, list, tuple)) and v:  # (an empty tuple is one shared object in Python)
        walk.visit(v, "constructor arguments", depth)
    if isinstance(v, dict):
        return {str(k): _plain(x, walk, depth + 1) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x, walk, depth + 1) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"constructor argument of type {type(v).__name__}")


def _precond(rec: Record, dtype: torch.dtype | None) -> torch.nn.Module:
    config = _init_arguments(rec)
    tensors: dict[str, torch.Tensor] = {}
    _module_tensors(rec, "", tensors)
    with torch.device("meta"):
        net = Precond(**config)
    expected = net.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"tensors do not match the network: missing {missing[:4]}, unexpected {extra[:4]}")
    for k, t in tensors.items():
        if t.shape != expected[k].shape:
            raise ValueError(f"{k} has shape {tuple(t.shape)}, the network needs {tuple(expected[k].shape)}")
        if dtype is not None and t.is_floating_point():
            tensors[k] = t.to(dtype)
    net.load_state_dict(tensors, assign=True)  # keeps the stored dtypes (float16 as published)
    return net.eval().requires_grad_(False)


def _encoder(rec: Record | None) -> EncoderInfo | None:
    if rec is None:
        return None
    if not isinstance(rec, Record):
        raise ValueError("'encoder' is not an encoder object")
    st = rec.state
    if rec.class_name == "StandardRGBEncoder":
        return EncoderInfo("standard_rgb")
    if rec.class_name == "StabilityVAEEncoder":
        scale, bias = np.asarray(st.get("scale")), np.asarray(st.get("bias"))
        if scale.dtype.kind != "f" or scale.shape != bias.shape or scale.ndim != 1:
            raise ValueError("StabilityVAEEncoder without per-channel float scale and bias")
        return EncoderInfo(
            "stability_vae",
            vae_name=str(st.get("vae_name")),
            scale=tuple(float(v) for v in scale),
            bias=tuple(float(v) for v in bias),
            batch_size=int(st.get("batch_size", 8)),
        )
    raise ValueError(f"unknown encoder class {rec.class_name!r}")


@dataclass
class OfficialCheckpoint:
    """What :func:`read` takes from an official pickle."""

    net: torch.nn.Module  # the EMA network ('ema'), a Precond, eval mode, no gradients
    encoder: EncoderInfo | None  # None when the file has no encoder (the official default is RGB)
    path: Path


def read(path: str | os.PathLike, dtype: torch.dtype | None = None) -> OfficialCheckpoint:
    """Reads the network (``ema``) and the encoder of an official EDM2 pickle, executing nothing.

    Args:
        path: an official ``.pkl`` (training snapshot, post-hoc reconstruction, published model).
        dtype: None keeps every tensor in its stored dtype (float16 as published); a float dtype
            casts the floating-point tensors.
    """
    path = Path(path)
    data = unpickle(path)
    if not isinstance(data, dict) or "ema" not in data:
        raise AutoguideError(f"{path}: not an official EDM2 network pickle (no 'ema' entry)")
    ema = data["ema"]
    if not isinstance(ema, Record) or ema.class_name != "Precond":
        name = ema.class_name if isinstance(ema, Record) else type(ema).__name__
        raise AutoguideError(f"{path}: 'ema' is a {name}, not an EDM2 Precond network")
    try:
        net = _precond(ema, dtype)
        encoder = _encoder(data.get("encoder"))
    except ValueError as e:
        raise AutoguideError(f"{path}: {e}") from None
    return OfficialCheckpoint(net, encoder, path)


def snapshot_metadata(path: str | os.PathLike) -> dict[str, str]:
    """``nimg`` and ``ema_std`` of an official file from its name ``<prefix>-<kimg>-<std>.pkl``
    (nimg recovered as the official tools do); empty when the name does not follow the pattern."""
    try:
        name = parse_official_name(Path(path).name)
        return dict(nimg=str(official_nimg(name.kimg)), ema_std=str(name.ema_std))
    except ValueError:
        return {}
