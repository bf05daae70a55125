"""The EDM2 loss with learned uncertainty and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

__all__ = ["edm2_loss", "learning_rate"]


def edm2_loss(
    net: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    sigma: torch.Tensor | None = None,
    scaled_noise: torch.Tensor | None = None,
    P_mean: float = -0.4,
    P_std: float = 1.0,
    generator: torch.Generator | None = None,
    sigma_data: float | None = None,
) -> torch.Tensor:
    """Per-element EDM2 loss [N, C, H, W] with learned uncertainty ``u(sigma)`` (Eq. 21):
    ``(weight / exp(u)) * (D(y + n; sigma) - y)^2 + u`` with ``weight = (s^2 + sd^2) / (s sd)^2``.

    Args:
        net: a :class:`~autoguide_fast.networks.Precond` (needs ``return_logvar``).
        images: clean data ``y`` [N, C, H, W].
        labels: None or [N, label_dim].
        sigma: noise levels [N]; default ``exp(N(P_mean, P_std^2))``.
        scaled_noise: noise already multiplied by sigma [N, C, H, W]; default drawn here.
        generator: source of the random sigma and noise.
        sigma_data: defaults to ``net.sigma_data`` (pass it when ``net`` is wrapped, e.g. by DDP).
    """
    n = images.shape[0]
    if sigma is None:
        sigma = (torch.randn(n, generator=generator, device=images.device) * P_std + P_mean).exp()
    sigma = sigma.reshape(-1, 1, 1, 1).to(images.dtype)
    if scaled_noise is None:
        scaled_noise = torch.randn(images.shape, generator=generator, device=images.device) * sigma
    sd = net.sigma_data if sigma_data is None else sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoised, logvar = net(images + scaled_noise, sigma, labels, return_logvar=True)
    return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar


def learning_rate(step_nimg: float, ref_lr: float, ref_nimg: float, rampup_nimg: float = 0.0) -> float:
    """EDM2 inverse-square-root decay ``ref_lr / sqrt(max(t / t_ref, 1))`` (``ref_nimg`` 0: no
    decay), with an optional linear ramp-up over the first ``rampup_nimg`` images."""
    if not ref_nimg >= 0:
        raise ValueError(f"ref_nimg must be >= 0 (0 = no decay), got {ref_nimg}")
    lr = ref_lr / math.sqrt(max(step_nimg / ref_nimg, 1.0)) if ref_nimg > 0 else ref_lr
    if rampup_nimg > 0:
        lr *= min(step_nimg / rampup_nimg, 1.0)
    return lr
