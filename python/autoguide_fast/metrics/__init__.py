"""Sample-quality metrics.

- FID and FD_DINOv2 exactly as NVlabs/edm2's ``calculate_metrics.py`` computes them: the detectors
  (:func:`inception`, :func:`dinov2`) from local weight files, streaming float64 statistics
  (:class:`FeatureStats`, :func:`image_stats`), reference files in the official layouts
  (:func:`load_ref`, :func:`save_ref`) and the Frechet distance (:func:`frechet_distance`).
- Improved k-NN precision and recall on feature vectors (:func:`knn_precision_recall`).
"""

from .compute import (
    NUM_IMAGES,
    FrechetMetric,
    image_stats,
    metrics_from_stats,
    rank_batches,
    stats_of_batches,
)
from .detectors import DETECTORS, detector, dinov2, inception, weights_path
from .frechet import FeatureStats, feature_stats, frechet_distance
from .knn import knn_precision_recall, knn_radii
from .refs import load_ref, save_ref

__all__ = [
    "DETECTORS",
    "NUM_IMAGES",
    "FeatureStats",
    "FrechetMetric",
    "detector",
    "dinov2",
    "feature_stats",
    "frechet_distance",
    "image_stats",
    "inception",
    "knn_precision_recall",
    "knn_radii",
    "load_ref",
    "metrics_from_stats",
    "rank_batches",
    "save_ref",
    "stats_of_batches",
    "weights_path",
]
