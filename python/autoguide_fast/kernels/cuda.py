"""CUDA implementations: the kernels in ``csrc/`` compiled at first use by NVRTC through CuPy
(``cupy.RawModule``; CuPy caches the binaries on disk per GPU architecture), launched on
PyTorch's current stream with the tensors' own pointers, and registered as torch custom ops for
CUDA tensors only (a CPU tensor cannot reach a launch) with fake implementations for
``torch.compile`` and CUDA graphs. Every op returns contiguous tensors, and so do the fakes
(whatever the inputs' strides). This module imports CuPy lazily; nothing here queries a GPU at
import time."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

__all__ = ["available", "cupy_extra", "guided_euler", "guided_heun", "kernel_source", "mp_attention"]

CSRC = Path(__file__).parent / "csrc"
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
HEAD_DIMS = (32, 64, 128)
# NVRTC options at run time (CuPy adds the architecture); `--check` compiles with the same ones.
NVRTC_OPTIONS = ("--std=c++17", "--extra-device-vectorization")
EPS = 1e-4  # networks.mp.normalize


def kernel_source(name: str) -> str:
    """A kernel file with ``common.cuh`` inlined (so that NVRTC needs no include path)."""
    common = (CSRC / "common.cuh").read_text()
    return (CSRC / name).read_text().replace('#include "common.cuh"', common)


def cupy_extra() -> str:
    """The package extra whose CuPy matches torch's CUDA build: ``cuda13`` for CUDA 13 and newer,
    ``cuda12`` otherwise (one extra per CUDA major version: two CuPy builds in one environment
    clash)."""
    major = (torch.version.cuda or "12").split(".")[0]
    return "cuda13" if major.isdigit() and int(major) >= 13 else "cuda12"


@functools.cache
def available() -> bool:
    """CuPy importable and a CUDA device visible to torch."""
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _function(module: str, kernel: str, device_index: int):
    # One compiled module and kernel handle per (file, kernel, device): the per-launch cost is
    # the launch itself (and nothing is compiled or looked up while a CUDA graph is captured,
    # once a first call has run).
    import cupy

    with cupy.cuda.Device(device_index):
        code = cupy.RawModule(code=kernel_source(module), options=NVRTC_OPTIONS)
        return code.get_function(kernel)


def _launch(module: str, kernel: str, device: torch.device, grid, block, args) -> None:
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    fn = _function(module, kernel, index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        fn(grid, block, args)


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _check(name: str, t: torch.Tensor, like: torch.Tensor, dtype=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, expected {like.device}")
    if t.dtype != (dtype or like.dtype):
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype or like.dtype}")
    if t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_step(x_hat: torch.Tensor, tensors: dict) -> None:
    if x_hat.device.type != "cuda":
        raise ValueError(f"x_hat must be a CUDA tensor, got one on {x_hat.device}")
    if x_hat.dtype not in _SUFFIX:
        raise TypeError(f"x_hat must be float32, float16 or bfloat16, got {x_hat.dtype}")
    _check("x_hat", x_hat, x_hat)
    for name, (t, dtype) in tensors.items():
        if t is not None:
            _check(name, t, x_hat, dtype)


def _grid(n: int, per_thread: int) -> tuple[tuple[int], tuple[int]]:
    threads = 256
    blocks = max(1, min((n // per_thread + threads - 1) // threads, 65535))
    return (blocks,), (threads,)


def _dense(*tensors):
    # The kernels index flat memory. Callers validate contiguity, but the ops may also be reached
    # from compiled graphs with other strides: those get a contiguous copy rather than wrong reads.
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)


def _aligned(*tensors) -> np.int32:
    return np.int32(all(t is None or t.data_ptr() % 16 == 0 for t in tensors))


@torch.library.custom_op("autoguide_fast::guided_euler", mutates_args=(), device_types="cuda")
def _guided_euler_op(
    x_hat: torch.Tensor,
    d_main: torch.Tensor,
    d_guide: torch.Tensor | None,
    weight: float,
    t_hat: float,
    t_next: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    x_hat, d_main, d_guide = _dense(x_hat, d_main, d_guide)
    x_next = x_hat.new_empty(x_hat.shape)
    d = x_hat.new_empty(x_hat.shape, dtype=torch.float32)
    n = x_hat.numel()
    if n:
        grid, block = _grid(n, 16 // x_hat.element_size())
        args = (
            _ptr(x_hat),
            _ptr(d_main),
            _ptr(d_guide),
            _ptr(x_next),
            _ptr(d),
            np.int64(n),
            np.float32(weight),
            np.float32(t_hat),
            np.float32(t_next - t_hat),
            _aligned(x_hat, d_main, d_guide, x_next, d),
        )
        _launch("guided_step.cu", f"guided_euler_{_SUFFIX[x_hat.dtype]}", x_hat.device, grid, block, args)
    return x_next, d


# The fakes allocate like the real ops (new_empty: contiguous, whatever the inputs' strides), so
# that compiled graphs see the strides the kernels produce.
@_guided_euler_op.register_fake
def _(x_hat, d_main, d_guide, weight, t_hat, t_next):
    return x_hat.new_empty(x_hat.shape), x_hat.new_empty(x_hat.shape, dtype=torch.float32)


@torch.library.custom_op("autoguide_fast::guided_heun", mutates_args=(), device_types="cuda")
def _guided_heun_op(
    x_hat: torch.Tensor,
    x_next: torch.Tensor,
    d_cur: torch.Tensor,
    d_main: torch.Tensor,
    d_guide: torch.Tensor | None,
    weight: float,
    t_hat: float,
    t_next: float,
) -> torch.Tensor:
    x_hat, x_next, d_cur, d_main, d_guide = _dense(x_hat, x_next, d_cur, d_main, d_guide)
    out = x_hat.new_empty(x_hat.shape)
    n = x_hat.numel()
    if n:
        grid, block = _grid(n, 16 // x_hat.element_size())
        args = (
            _ptr(x_hat),
            _ptr(x_next),
            _ptr(d_cur),
            _ptr(d_main),
            _ptr(d_guide),
            _ptr(out),
            np.int64(n),
            np.float32(weight),
            np.float32(t_next),
            np.float32(t_next - t_hat),
            _aligned(x_hat, x_next, d_cur, d_main, d_guide, out),
        )
        _launch("guided_step.cu", f"guided_heun_{_SUFFIX[x_hat.dtype]}", x_hat.device, grid, block, args)
    return out


@_guided_heun_op.register_fake
def _(x_hat, x_next, d_cur, d_main, d_guide, weight, t_hat, t_next):
    return x_hat.new_empty(x_hat.shape)


TC_QUERIES = 64  # queries per block of the tensor-core kernel (mp_attention_tc.cu)


@torch.library.custom_op("autoguide_fast::mp_attention", mutates_args=(), device_types="cuda")
def _mp_attention_op(qkv: torch.Tensor, num_heads: int, tensor_cores: bool) -> torch.Tensor:
    (qkv,) = _dense(qkv)
    n, c3, h, w = qkv.shape
    c = c3 // 3
    d = c // num_heads
    y = qkv.new_empty(n, c, h, w)
    if y.numel() == 0:  # a zero grid dimension is not a valid launch
        return y
    args = (_ptr(qkv), _ptr(y), np.int32(num_heads), np.int32(h * w), np.float32(EPS))
    suffix = f"{_SUFFIX[qkv.dtype]}_d{d}"
    if tensor_cores:
        grid = ((h * w + TC_QUERIES - 1) // TC_QUERIES, num_heads, n)
        _launch("mp_attention_tc.cu", f"mp_attention_tc_{suffix}", qkv.device, grid, (128,), args)
    else:
        tile = 16 if d == 128 else 32
        grid = ((h * w + tile - 1) // tile, num_heads, n)
        _launch("mp_attention.cu", f"mp_attention_{suffix}", qkv.device, grid, (128,), args)
    return y


@_mp_attention_op.register_fake
def _(qkv, num_heads, tensor_cores):
    n, c3, h, w = qkv.shape
    return qkv.new_empty(n, c3 // 3, h, w)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def tensor_cores_for(qkv: torch.Tensor) -> bool:
    """Whether the tensor-core kernel serves ``qkv``: float16/bfloat16 on sm_80 or newer."""
    if qkv.dtype not in (torch.float16, torch.bfloat16):
        return False
    index = qkv.device.index if qkv.device.index is not None else torch.cuda.current_device()
    return _capability(index) >= (8, 0)


def guided_euler(x_hat, d_main, d_guide, weight, t_hat, t_next):
    """Fused Euler step on CUDA; validates every input first."""
    _check_step(x_hat, dict(d_main=(d_main, None), d_guide=(d_guide, None)))
    return _guided_euler_op(x_hat, d_main, d_guide, float(weight), float(t_hat), float(t_next))


def guided_heun(x_hat, x_next, d_cur, d_main, d_guide, weight, t_hat, t_next):
    """Fused Heun correction on CUDA; validates every input first."""
    _check_step(
        x_hat,
        dict(
            x_next=(x_next, None),
            d_cur=(d_cur, torch.float32),
            d_main=(d_main, None),
            d_guide=(d_guide, None),
        ),
    )
    return _guided_heun_op(x_hat, x_next, d_cur, d_main, d_guide, float(weight), float(t_hat), float(t_next))


MAX_GRID_YZ = 65535  # CUDA's limit on gridDim.y and gridDim.z (heads and batch)


def supports_attention(qkv: torch.Tensor, num_heads: int) -> bool:
    n, c3, h, w = qkv.shape
    return (
        qkv.device.type == "cuda"
        and qkv.dtype in _SUFFIX
        and qkv.is_contiguous()
        and num_heads >= 1
        and c3 % (3 * num_heads) == 0
        and c3 // 3 // num_heads in HEAD_DIMS
        and n <= MAX_GRID_YZ
        and num_heads <= MAX_GRID_YZ
    )


def mp_attention(qkv: torch.Tensor, num_heads: int, tensor_cores: bool | None = None) -> torch.Tensor:
    """Fused attention on CUDA for head dims 32, 64, 128; validates every input first.
    ``tensor_cores``: the mma kernel (float16/bfloat16, sm_80+) or the float32-arithmetic one;
    None picks the tensor-core kernel wherever it applies."""
    if qkv.ndim != 4:
        raise ValueError(f"qkv must be [N, 3C, H, W], got {tuple(qkv.shape)}")
    if not supports_attention(qkv, num_heads):
        raise ValueError(
            f"qkv {tuple(qkv.shape)} {qkv.dtype} on {qkv.device} with {num_heads} heads is not supported "
            f"by the CUDA kernel (contiguous CUDA float32/float16/bfloat16, head dim in {HEAD_DIMS}, "
            f"batch and heads at most {MAX_GRID_YZ})"
        )
    if tensor_cores is None:
        tensor_cores = tensor_cores_for(qkv)
    elif tensor_cores and not tensor_cores_for(qkv):
        raise ValueError(
            f"tensor_cores=True needs float16 or bfloat16 on an sm_80+ GPU, got {qkv.dtype} on {qkv.device}"
        )
    return _mp_attention_op(qkv, int(num_heads), bool(tensor_cores))
