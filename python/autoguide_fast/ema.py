"""Power-function EMA (Karras et al. 2024, Section 3): the conversions live in the Rust core.

- :func:`std_to_exp`, :func:`exp_to_std`: relative std <-> power-function exponent (Eqs. 123-126).
- :func:`power_function_beta`: per-update decay tracking a profile (Eq. 127).
- :class:`PowerFunctionEMA`: tracks several EMA widths of a network at once during training.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ._core import STD_MAX, exp_to_std, power_function_beta, std_to_exp

__all__ = ["STD_MAX", "PowerFunctionEMA", "exp_to_std", "power_function_beta", "std_to_exp"]


class PowerFunctionEMA:
    """EMA copies of ``net`` with power-function profiles of relative widths ``stds``.

    Call :meth:`update` after every optimiser step with the training time after the step
    (``t_next``, in images or iterations) and the time the step covered (``t_delta``).
    """

    @torch.no_grad()
    def __init__(self, net: torch.nn.Module, stds: Sequence[float] = (0.050, 0.100)):
        if not stds:
            raise ValueError("stds must list at least one EMA width, got []")
        self.stds = [float(s) for s in stds]
        for s in self.stds:
            std_to_exp(s)  # raises ValueError naming the bad width
        self.net = net
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]

    @torch.no_grad()
    def update(self, t_next: float, t_delta: float) -> None:
        params = [p.detach() for p in self.net.parameters()]
        for std, ema in zip(self.stds, self.emas):
            beta = power_function_beta(std, float(t_next), float(t_delta))
            ema_params = list(ema.parameters())
            torch._foreach_lerp_(ema_params, params, 1.0 - beta)
            for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
                b_ema.copy_(b_net)
