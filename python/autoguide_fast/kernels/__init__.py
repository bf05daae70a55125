"""Fused operations with a CUDA implementation (``csrc/``, NVRTC through CuPy) and a pure-torch
reference. The sampler and the network call these functions; the dispatcher picks CUDA for
CUDA tensors when CuPy is installed (``pip install autoguide_fast[cuda12]`` or ``[cuda13]``, after
the CUDA major version of torch's build), the reference otherwise.
``AUTOGUIDE_KERNELS=reference|cuda|auto`` (default ``auto``) forces a path; ``auto`` logs its
choice once, and trusts a kernel only after it proved itself: on first use per kernel, device and
dtype it runs on a small input next to the reference, and a mismatch beyond the dtype's tolerance
or any launch error makes it warn once and use the reference for the rest of the process
(``cuda`` forces the kernel, unchecked, and raises on errors).

- :func:`guided_euler`, :func:`guided_heun`: the arithmetic of a guided Heun sampler step.
- :func:`mp_attention`: magnitude-preserving self-attention from the qkv convolution output.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from . import cuda, reference

__all__ = ["guided_euler", "guided_heun", "mode", "mp_attention", "reference"]

_log = logging.getLogger(__name__)
_announced: set = set()
_trusted: dict[tuple, bool] = {}

# Relative error (norm) a kernel may show against the reference on the self-check input: float32
# kernels and references differ by accumulation order (~1e-6), half-precision attention by the
# rounding of probabilities and outputs (~1e-3 fp16, ~1e-2 bf16); a wrong kernel is off by O(1).
_SELF_CHECK_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def mode() -> str:
    """The requested path: ``AUTOGUIDE_KERNELS`` (reference, cuda or auto)."""
    value = os.environ.get("AUTOGUIDE_KERNELS", "auto").strip().lower()
    if value not in ("reference", "cuda", "auto"):
        raise ValueError(f"AUTOGUIDE_KERNELS must be reference, cuda or auto, got {value!r}")
    return value


def _use_cuda(t: torch.Tensor, what: str) -> bool:
    m = mode()
    if m == "cuda" and t.device.type != "cuda" and ("cpu", what) not in _announced:
        _announced.add(("cpu", what))
        warnings.warn(
            f"AUTOGUIDE_KERNELS=cuda, but the {what} gets {t.device.type} tensors, which the CUDA kernels "
            "cannot take: the torch reference runs",
            stacklevel=3,
        )
    if m == "reference" or t.device.type != "cuda":
        return False
    ok = cuda.available()
    if m == "cuda" and not ok:
        extra = cuda.cupy_extra()
        raise RuntimeError(
            f"AUTOGUIDE_KERNELS=cuda, but CuPy is not installed (pip install 'autoguide_fast[{extra}]')"
        )
    if m == "auto" and what not in _announced:
        _announced.add(what)
        _log.info("autoguide_fast: %s uses the %s path", what, "CUDA kernel" if ok else "torch reference")
    return ok


def _self_check_inputs(what: str, device, dtype):
    g = torch.Generator(device).manual_seed(0)
    if what == "attention":
        return (torch.randn(2, 3 * 64, 8, 8, generator=g, device=device).to(dtype), 1)
    x, m, d = (torch.randn(2, 4, 8, 8, generator=g, device=device).to(dtype) for _ in range(3))
    return (x, m, d, 2.0, 1.0, 0.5)


def _check_kernel(what: str, t: torch.Tensor) -> bool:
    """Whether the CUDA kernel ``what`` may serve tensors like ``t`` (see the module docstring)."""
    if mode() == "cuda":
        return True
    key = (what, t.device, t.dtype)
    capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
    if key not in _trusted and (torch.compiler.is_compiling() or capturing):
        return False  # no self-check inside a trace or a graph capture: the reference, until checked
    if key not in _trusted:
        args = _self_check_inputs(what, t.device, t.dtype)
        try:
            if what == "attention":
                got, want = cuda.mp_attention(*args), reference.mp_attention(*args)
            else:
                xk, dk = cuda.guided_euler(*args)
                xr, dr = reference.guided_euler(*args)
                got = torch.cat(
                    [xk.float().flatten(), cuda.guided_heun(args[0], xk, dk, *args[1:]).float().flatten()]
                )
                want = torch.cat(
                    [
                        xr.float().flatten(),
                        reference.guided_heun(args[0], xr, dr, *args[1:]).float().flatten(),
                    ]
                )
            err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
            ok, why = err <= _SELF_CHECK_TOL.get(t.dtype, 1e-4), f"differs from the reference by {err:.2e}"
        except Exception as e:  # a launch or compile failure: the reference serves instead
            ok, why = False, f"failed: {type(e).__name__}: {e}"
        _trusted[key] = ok
        if not ok:
            warnings.warn(
                f"autoguide_fast: the CUDA {what} kernel {why} on {t.device} in {t.dtype}; the torch "
                "reference runs instead for this process (AUTOGUIDE_KERNELS=cuda forces the kernel)",
                stacklevel=3,
            )
    return _trusted[key]


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fusable(*tensors) -> bool:
    # The fused step takes contiguous float32/16/bf16 tensors of one shape, dtype and device;
    # anything else (float64 sampling, mixed devices, strided views) uses the reference.
    first = tensors[0]
    return first.dtype in _KERNEL_DTYPES and all(
        t is None
        or (
            t.is_contiguous()
            and t.shape == first.shape
            and t.dtype == first.dtype
            and t.device == first.device
        )
        for t in tensors
    )


def guided_euler(x_hat, d_main, d_guide, weight: float, t_hat: float, t_next: float):
    """``(x_next, d)``: Euler step from ``t_hat`` to ``t_next`` with ``D = D_guide.lerp(D_main, w)``
    (``D_main`` when ``d_guide`` is None); ``d`` (float32 on CUDA) feeds :func:`guided_heun`."""
    if (
        _use_cuda(x_hat, "guided step")
        and _fusable(x_hat, d_main, d_guide)
        and _check_kernel("guided step", x_hat)
    ):
        return cuda.guided_euler(x_hat, d_main, d_guide, weight, t_hat, t_next)
    return reference.guided_euler(x_hat, d_main, d_guide, weight, t_hat, t_next)


def guided_heun(x_hat, x_next, d_cur, d_main, d_guide, weight: float, t_hat: float, t_next: float):
    """Heun-corrected state at ``t_next``, from the Euler result and the guided denoiser there."""
    if (
        _use_cuda(x_hat, "guided step")
        and _fusable(x_hat, x_next, d_main, d_guide)
        and d_cur.dtype == torch.float32
        and d_cur.is_contiguous()
        and d_cur.shape == x_hat.shape
        and d_cur.device == x_hat.device
        and _check_kernel("guided step", x_hat)
    ):
        return cuda.guided_heun(x_hat, x_next, d_cur, d_main, d_guide, weight, t_hat, t_next)
    return reference.guided_heun(x_hat, x_next, d_cur, d_main, d_guide, weight, t_hat, t_next)


def mp_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Attention of the EDM2 block: qkv [N, 3C, H, W] -> [N, C, H, W] (see ``reference``). The
    CUDA kernel serves inference with head dims 32, 64 and 128; other shapes, and inputs that
    need gradients, use the reference."""
    # The kernel has no backward: under autograd (training) the reference runs, so gradients flow.
    if _use_cuda(qkv, "attention") and not (torch.is_grad_enabled() and qkv.requires_grad):
        if cuda.supports_attention(qkv, num_heads) and _check_kernel("attention", qkv):
            return cuda.mp_attention(qkv, num_heads)
    return reference.mp_attention(qkv, num_heads)
