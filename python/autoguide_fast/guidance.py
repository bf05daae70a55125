"""Guidance wrappers: a guided denoiser is ``D = D_guide.lerp(D_main, weight)``.

- :class:`Autoguidance` (Karras et al. 2024): the guide is a weaker version of the main model
  (smaller and/or trained for less time) evaluated with the *same* labels.
- :class:`CFG` (Ho & Salimans 2022): the guide is the unconditional model, called without labels.

Both take an optional guidance interval ``(sigma_lo, sigma_hi)`` (Kynkaanniemi et al. 2024,
inclusive bounds): outside it, and whenever ``weight == 1``, the guide is not evaluated at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import checks

Denoiser = Callable[..., torch.Tensor]

__all__ = ["CFG", "Autoguidance", "Combined", "Denoiser", "Guidance"]


def _checked(d_guide, d_main: torch.Tensor) -> torch.Tensor:
    if not isinstance(d_guide, torch.Tensor) or d_guide.shape != d_main.shape:
        got = tuple(d_guide.shape) if isinstance(d_guide, torch.Tensor) else type(d_guide)
        raise ValueError(f"guide output must have the main model's shape {tuple(d_main.shape)}, got {got}")
    return d_guide.to(d_main.dtype)


class Guidance:
    """Common part of the guidance methods; use :class:`Autoguidance` or :class:`CFG`.

    Args:
        guide: denoiser ``D0(x, sigma, labels=None) -> Tensor`` (same shape as the main model's).
        weight: guidance weight ``w``; 1 means no guidance, the guide is then never called.
        interval: ``None`` (guide at every noise level) or ``(sigma_lo, sigma_hi)``.
    """

    def __init__(self, guide: Denoiser, weight: float, interval: tuple[float, float] | None = None):
        if not callable(guide):
            raise TypeError(f"guide must be a denoiser callable D(x, sigma, labels=None), got {type(guide)}")
        self.guide = guide
        self.weight = checks.number("weight", weight, 0)  # 1 = no guidance
        self.interval = checks.interval("interval", interval)

    guide_role = "guide"  # what error messages call the model whose output is guide-side

    @property
    def models(self) -> list[tuple[str, Denoiser]]:
        """The models this guidance evaluates besides the main model: ``[(role, denoiser)]``."""
        return [(self.guide_role, self.guide)]

    @property
    def active(self) -> bool:
        """Whether the guide can be evaluated at all (``weight != 1``)."""
        return self.weight != 1.0

    def guide_labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels the guide is called with."""
        raise NotImplementedError

    def evaluate(
        self, net: Denoiser, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, guided: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(D_main, D_guide)`` at ``x`` [N, ...], ``sigma`` [N]; ``D_guide`` is None (and the guide
        not evaluated) when ``guided`` (from the step plan) is false or the weight is 1. The
        guided output is ``D_guide.lerp(D_main, weight)``."""
        d_main = net(x, sigma, labels)
        if not (guided and self.active):
            return d_main, None
        return d_main, _checked(self.guide(x, sigma, self.guide_labels(labels)), d_main)

    def __call__(
        self, net: Denoiser, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None, guided: bool
    ) -> torch.Tensor:
        """Guided denoiser output at ``x`` [N, ...], ``sigma`` [N]; ``guided`` comes from the step plan."""
        d_main, d_guide = self.evaluate(net, x, sigma, labels, guided)
        return d_main if d_guide is None else d_guide.lerp(d_main, self.weight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, interval={self.interval})"


class Autoguidance(Guidance):
    """Autoguidance: ``D = D0(x; c).lerp(D1(x; c), w)`` with a weaker guide ``D0`` of the same task."""

    def guide_labels(self, labels):
        return labels


class CFG(Guidance):
    """Classifier-free guidance: ``D = D_uncond(x).lerp(D(x; c), w)``; the guide gets no labels."""

    guide_role = "CFG model"

    def guide_labels(self, labels):
        return None


class Combined(Guidance):
    """CFG and autoguidance together (autoguidance paper, appendix): one total weight ``w`` split
    by ``alpha`` between the unconditional model (``alpha``) and the weak guide (``1 - alpha``):
    ``D = D1 + (w - 1) [(1 - alpha) (D1 - D0) + alpha (D1 - D_uncond)]``.
    ``alpha = 0`` is autoguidance, ``alpha = 1`` is CFG."""

    def __init__(
        self,
        guide: Denoiser,
        uncond: Denoiser,
        weight: float,
        alpha: float = 0.5,
        interval: tuple[float, float] | None = None,
    ):
        super().__init__(guide, weight, interval)
        if not callable(uncond):
            raise TypeError(
                f"uncond must be a denoiser callable D(x, sigma, labels=None), got {type(uncond)}"
            )
        self.uncond = uncond
        self.alpha = checks.number("alpha", alpha, 0, 1)

    @property
    def models(self) -> list[tuple[str, Denoiser]]:
        return [("guide", self.guide), ("CFG model", self.uncond)]

    def evaluate(self, net, x, sigma, labels, guided):
        """``(D_main, G)`` with the effective guide ``G = (1 - alpha) D0 + alpha D_uncond``, so that
        ``G.lerp(D_main, w)`` is the combined output; a guide with no share is not evaluated."""
        d_main = net(x, sigma, labels)
        if not (guided and self.active):
            return d_main, None
        if self.alpha == 0:
            return d_main, _checked(self.guide(x, sigma, labels), d_main)
        if self.alpha == 1:
            return d_main, _checked(self.uncond(x, sigma, None), d_main)
        d_guide = _checked(self.guide(x, sigma, labels), d_main)
        d_uncond = _checked(self.uncond(x, sigma, None), d_main)
        return d_main, d_guide.lerp(d_uncond, self.alpha)

    def __repr__(self) -> str:
        return f"Combined(weight={self.weight}, alpha={self.alpha}, interval={self.interval})"
