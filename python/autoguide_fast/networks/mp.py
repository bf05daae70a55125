"""Magnitude-preserving primitives (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Section 2 and Appendix B), shared by the EDM2 U-Net and the
toy model. Equation numbers refer to that paper."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..kernels.reference import normalize

__all__ = ["MPConv", "MPFourier", "MPSiLU", "mp_cat", "mp_silu", "mp_sum", "normalize", "resample"]

# 0.596 = std of silu(x) for x ~ N(0, 1), so mp_silu keeps unit magnitudes.
_SILU_STD = 0.596


# Up- or downsampling by 2 with a separable box-like filter, or nothing ('keep').
def resample(x: torch.Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    if mode == "keep":
        return x
    f = np.asarray(f, dtype=np.float32)
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    f = torch.as_tensor(np.outer(f, f)[None, None], dtype=x.dtype, device=x.device)
    c = x.shape[1]
    if mode == "down":
        return torch.nn.functional.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    if mode == "up":
        return torch.nn.functional.conv_transpose2d(
            x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,)
        )
    raise ValueError(f"resample mode must be 'keep', 'up' or 'down', got {mode!r}")


# Magnitude-preserving SiLU (Eq. 81).
def mp_silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x) / _SILU_STD


# Magnitude-preserving sum (Eq. 88): lerp, rescaled to unit magnitude.
def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


# Magnitude-preserving concatenation (Eq. 103).
def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


class MPSiLU(torch.nn.Module):
    """Module form of :func:`mp_silu` (keeps the toy model's reference state-dict layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mp_silu(x)


class MPFourier(torch.nn.Module):
    """Magnitude-preserving Fourier features (Eq. 75): ``sqrt(2) cos(2 pi (f x + p))`` with
    random frequencies ``f`` and phases ``p`` kept as buffers."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)  # float32 as the official code; float64 kept
        y = x.to(ct).ger(self.freqs.to(ct)) + self.phases.to(ct)
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (``kernel`` = (kh, kw)) or fully connected layer
    (``kernel`` = ()), Eq. 47, with forced weight normalisation in training mode (Eq. 66).

    In eval mode without autograd the normalised, scaled and cast weight is computed once and
    reused until the weight (or the gain) changes: in-place updates bump the tensors' version
    counters, which key the cache.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self.use_cache = True  # set False to recompute the weight on every call (benchmarks)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._forced: tuple[int, int] | None = None  # (weight id, version) after forced normalisation

    def effective_weight(self, dtype: torch.dtype, gain=1) -> torch.Tensor:
        """The weight actually applied: unit norm per output, times ``gain / sqrt(fan_in)``."""
        cacheable = (
            self.use_cache
            and not self.training
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
        )
        if cacheable:
            gain_key = (id(gain), gain._version) if isinstance(gain, torch.Tensor) else gain
            key = (id(self.weight), self.weight._version, self.weight.device, dtype, gain_key)
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if self.training and self._forced != (id(self.weight), self.weight._version):
            # Forced weight normalisation, once per change of the weight (after each optimiser
            # step): the accumulation rounds of one step then all see the same weight. Repeating
            # it would shrink the weight by another 1 / (1 + eps) per round.
            with torch.no_grad():
                self.weight.copy_(normalize(w))
            self._forced = (id(self.weight), self.weight._version)
        w = normalize(w)  # traditional weight normalisation
        w = (w * (gain / np.sqrt(w[0].numel()))).to(dtype)  # magnitude-preserving scaling
        if cacheable:
            self._cache = (key, w)
        return w

    def forward(self, x: torch.Tensor, gain=1) -> torch.Tensor:
        w = self.effective_weight(x.dtype, gain)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)
