"""Feature statistics and the Frechet distance between the Gaussians they define (FID, FD_DINOv2)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["FeatureStats", "feature_stats", "frechet_distance"]


class FeatureStats:
    """Running float64 sums of features and of their outer products, as the official
    ``calculate_metrics.py`` keeps them: memory O(D^2) whatever the number of images, and the same
    statistics whatever the batching or the number of processes (:meth:`all_reduce` sums ranks).

    ``mu = s / N``, ``sigma = (S - N mu mu^T) / (N - 1)`` (the unbiased covariance)."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.num = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, features: torch.Tensor) -> None:
        """Adds features [B, D]."""
        if features.ndim != 2 or features.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must be [B, {self.sum.shape[0]}], got {tuple(features.shape)}")
        f = features.to(self.sum.device, torch.float64)
        self.sum += f.sum(0)
        self.sum_sq += f.T @ f
        self.num += f.shape[0]

    def all_reduce(self) -> FeatureStats:
        """Sums the statistics of every process (under torch.distributed); a no-op alone."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            for t in (self.sum, self.sum_sq, self.num):
                dist.all_reduce(t)
        return self

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and covariance [D, D], float64 numpy arrays (at least 2 features needed)."""
        n = int(self.num)
        if n < 2:
            raise ValueError(f"statistics need at least 2 images, got {n}")
        mu = self.sum / n
        sigma = (self.sum_sq - torch.outer(mu, mu) * n) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of features [N, D]."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got {tuple(features.shape)}")
    stats = FeatureStats(features.shape[1])
    stats.update(features.detach().cpu())
    return stats.mu_sigma()


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64:
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``.

    ``tr sqrtm(S1 S2)`` is the sum of the square roots of the eigenvalues of ``L^T S2 L`` with
    ``S1 = L L^T`` (a similar symmetric matrix, so one symmetric eigenvalue problem instead of a
    general ``sqrtm``); where S1 is singular (fewer images than features) ``L`` is its symmetric
    square root. Negative round-off eigenvalues count as 0. Agrees with the official
    ``scipy.linalg.sqrtm`` form to ~1e-13 relative where that one is accurate."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise ValueError("statistics hold NaN or inf")
    try:
        lower = np.linalg.cholesky(s1)
    except np.linalg.LinAlgError:  # singular: the symmetric square root serves as well
        lower = _sqrt_psd(s1)
    inner = lower.T @ s2 @ lower
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    value = float(np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
    # The distance of covariances is >= 0; below minus round-off the inputs were no covariances.
    if value < -1e-6 * (np.trace(s1) + np.trace(s2) + 1e-300):
        raise ValueError(
            f"the statistics give a negative distance ({value:.4g}): sigma1 and sigma2 must be "
            "covariances (symmetric positive semi-definite)"
        )
    return max(value, 0.0)
