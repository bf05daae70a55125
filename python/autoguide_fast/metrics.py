"""Sample-quality metrics on feature vectors."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["feature_stats", "frechet_distance", "knn_precision_recall", "knn_radii"]


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of features [N, D]."""
    f = features.detach().to("cpu", torch.float64).numpy()
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Frechet distance between Gaussians N(mu1, cov1) and N(mu2, cov2), float64:
    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^1/2 cov2 cov1^1/2)^1/2)``. The matrix
    square roots come from symmetric eigendecompositions (negative round-off eigenvalues are
    clipped), which stays real and stable where a general sqrtm can fail."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu {mu1.shape} / {mu2.shape}, cov {cov1.shape} / {cov2.shape}"
        )

    def sqrt_psd(a):
        w, v = np.linalg.eigh((a + a.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    s1 = sqrt_psd(cov1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s1 @ cov2 @ s1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross)


def knn_radii(features: torch.Tensor, k: int = 3, chunk: int = 1024) -> torch.Tensor:
    """Distance from every row of ``features`` [N, D] to its k-th nearest other row: [N]."""
    if not 1 <= k < features.shape[0]:
        raise ValueError(
            f"k must be in [1, {features.shape[0] - 1}] for {features.shape[0]} features, got {k}"
        )
    out = []
    for rows in features.split(chunk):
        d = torch.cdist(rows, features)
        # The (k+1)-th smallest distance (the 1st is the row itself); topk selects it about 4x
        # faster than kthvalue on the CPU, with the same value.
        out.append(d.topk(k + 1, dim=1, largest=False, sorted=True).values[:, k])
    return torch.cat(out)


def _coverage(points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int) -> torch.Tensor:
    # Fraction of points inside at least one ball (center, radius).
    inside = [(torch.cdist(rows, centers) <= radii).any(dim=1) for rows in points.split(chunk)]
    return torch.cat(inside).float().mean()


def knn_precision_recall(
    real: torch.Tensor,
    fake: torch.Tensor,
    k: int = 3,
    chunk: int = 1024,
    real_radii: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) of ``fake`` [M, D] against
    ``real`` [N, D]: precision = share of fake samples inside the real k-NN manifold, recall =
    share of real samples inside the fake k-NN manifold. ``real_radii`` (``knn_radii(real, k)``)
    may be given when one reference serves many evaluations."""
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(
            "real and fake must be [N, D] and [M, D] with the same D, "
            f"got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    real, fake = real.float(), fake.float()
    if real_radii is None:
        real_radii = knn_radii(real, k, chunk)
    elif real_radii.shape != (real.shape[0],):
        raise ValueError(f"real_radii must be [{real.shape[0]}], got {tuple(real_radii.shape)}")
    precision = _coverage(fake, real, real_radii.float(), chunk)
    recall = _coverage(real, fake, knn_radii(fake, k, chunk), chunk)
    return float(precision), float(recall)
