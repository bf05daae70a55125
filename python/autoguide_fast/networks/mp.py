"""Magnitude-preserving primitives (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Section 2 and Appendix B)."""

from __future__ import annotations

import math

import torch

__all__ = ["MPLinear", "mp_silu", "normalize"]

# 0.596 = std of silu(x) for x ~ N(0, 1) (Eq. 81), so mp_silu keeps unit magnitudes.
_SILU_STD = 0.596


def normalize(x: torch.Tensor, dim=None, eps: float = 1e-4) -> torch.Tensor:
    """Scales ``x`` to unit RMS over ``dim`` (default: all but the first), Eq. 47:
    ``x / (eps + ||x|| / sqrt(numel / norm.numel))``."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """Magnitude-preserving SiLU (Eq. 81)."""
    return torch.nn.functional.silu(x) / _SILU_STD


class MPLinear(torch.nn.Module):
    """Linear layer with a unit-norm weight per output (Eq. 47); in training mode the stored
    weight is forced back to unit norm before every use (Eq. 63, forced weight normalisation)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out_dim, in_dim))

    def normalized_weight(self) -> torch.Tensor:
        """The effective weight [out, in]: unit-norm rows scaled by 1/sqrt(in)."""
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        return normalize(self.weight) / math.sqrt(self.weight[0].numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.normalized_weight().t()


class MPSiLU(torch.nn.Module):
    """Module form of :func:`mp_silu` (keeps the state-dict layout of the reference)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mp_silu(x)
