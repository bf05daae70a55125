"""Pure-torch references of the fused kernels (used on CPUs and whenever CUDA kernels are off)."""

from __future__ import annotations

import math

import torch

__all__ = [
    "guided_denoised",
    "guided_euler",
    "guided_heun",
    "mp_attention",
    "mp_attention_float64",
    "normalize",
]


def guided_denoised(d_main: torch.Tensor, d_guide: torch.Tensor | None, weight: float) -> torch.Tensor:
    """``D = D_guide + w (D_main - D_guide)``, or ``D_main`` without a guide."""
    return d_main if d_guide is None else d_guide.lerp(d_main, weight)


def guided_euler(x_hat, d_main, d_guide, weight: float, t_hat: float, t_next: float):
    """Euler step of the guided ODE: returns ``(x_next, d)`` with ``d = (x_hat - D) / t_hat``."""
    d = (x_hat - guided_denoised(d_main, d_guide, weight)) / t_hat
    return x_hat + (t_next - t_hat) * d, d


def guided_heun(x_hat, x_next, d_cur, d_main, d_guide, weight: float, t_hat: float, t_next: float):
    """Heun correction: averages ``d_cur`` with the slope at ``(x_next, t_next)``."""
    d_prime = (x_next - guided_denoised(d_main, d_guide, weight)) / t_next
    # d_cur may be float32 from the fused Euler step while the state is half precision.
    return (x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)).to(x_hat.dtype)


def mp_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Self-attention with pixel-normalised q, k, v read from the qkv convolution output
    [N, 3C, H, W] viewed as [N, heads, C/heads, 3, H*W]; returns [N, C, H, W]."""
    n, c3, h, w = qkv.shape
    if num_heads < 1 or c3 % (3 * num_heads) != 0:
        raise ValueError(f"qkv channels ({c3}) must be divisible by 3 * num_heads ({3 * num_heads})")
    y = qkv.reshape(n, num_heads, -1, 3, h * w)
    q, k, v = normalize(y, dim=2).unbind(3)  # each [N, heads, C/heads, HW]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
    )
    return out.transpose(-1, -2).reshape(n, c3 // 3, h, w)


def mp_attention_float64(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """:func:`mp_attention` in float64, written out with einsum (no fused path): the yardstick the
    kernels' tests and benchmarks measure every attention path against. Returns float64."""
    n, c3, h, w = qkv.shape
    y = qkv.double().reshape(n, num_heads, -1, 3, h * w)
    d = y.shape[2]
    y = y / (1e-4 + y.norm(dim=2, keepdim=True) / math.sqrt(d))
    q, k, v = y.unbind(3)
    a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(d)).softmax(dim=3)
    return torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, c3 // 3, h, w)


# Unit magnitude over `dim` (default: all but the first), Eq. 47: x / (eps + ||x|| / sqrt(n)).
# Normalises x to unit magnitude per slice (EDM2 Eq. 14's weight normalisation, eps-guarded); the
# magnitude-preserving layers (networks.mp) and the attention reference both use it.
def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    if dim is None:
        dim = list(range(1, x.ndim))
    # Accumulate in at least float32 (float64 stays float64).
    norm = torch.linalg.vector_norm(
        x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32)
    )
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)
