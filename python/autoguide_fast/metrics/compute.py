"""Streaming statistics of image sets and the metrics against a reference, as NVlabs/edm2's
``calculate_metrics.py`` computes them (``ref``, ``calc``, ``gen``), on one process or sharded
over ``torchrun`` ranks (one all-reduce of the float64 sums at the end)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from .. import checks
from ..data import ImageFiles
from ..files import file_identity
from ..generation import rank_batches
from .detectors import detector, weights_path
from .frechet import FeatureStats, frechet_distance
from .refs import load_ref

__all__ = [
    "NUM_IMAGES",
    "FrechetMetric",
    "image_stats",
    "metrics_from_stats",
    "rank_batches",
    "stats_of_batches",
]

NUM_IMAGES = 50_000  # the official calc/gen default


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _rgb(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if images.shape[1] == 1:  # grey: the detectors take RGB (as EDM1's fid.py repeats it)
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]}")
    return images


def stats_of_batches(
    batches: Iterable[torch.Tensor],
    detectors: Mapping[str, torch.nn.Module],
    *,
    device: torch.device | str | None = None,
    total: int | None = None,
    progress: bool = False,
) -> dict:
    """Feature statistics of uint8 image batches [B, C, H, W] (this process's share; summed over
    ranks under torch.distributed): ``{'num_images': N, metric: {'mu', 'sigma'}}``."""
    rank, _ = _rank_world()
    device = checks.device("device", device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stats: dict[str, FeatureStats] = {}
    bar = tqdm(total=total, unit="img", desc="features", disable=not progress or rank != 0)
    for images in batches:
        images = _rgb(torch.as_tensor(images)).to(device)
        for name, det in detectors.items():
            f = det(images)
            if name not in stats:
                stats[name] = FeatureStats(f.shape[1], device)
            stats[name].update(f)
        bar.update(len(images) * (_rank_world()[1]))
    bar.close()
    if not stats:  # a rank without images still joins the all-reduce
        stats = {n: FeatureStats(_dim(d, device), device) for n, d in detectors.items()}
    out: dict = {}
    for name, s in stats.items():
        s.all_reduce()
        out["num_images"] = int(s.num)
        mu, sigma = s.mu_sigma()
        out[name] = {"mu": mu, "sigma": sigma}
    return out


def _dim(det: torch.nn.Module, device) -> int:
    probe = torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device)
    return int(det(probe).shape[1])


def image_stats(
    images: str | os.PathLike | ImageFiles,
    detectors: Mapping[str, torch.nn.Module],
    *,
    num: int | None = None,
    seed: int = 0,
    batch: int = 64,
    workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict:
    """Statistics of the images of a folder, zip or ``.npz`` (streamed: memory independent of
    their number). ``num``: that many images (None: all), chosen as the official tool does (a
    seeded shuffle of the sorted files, the first ``num``, sorted again); fewer is an error."""
    ds = images if isinstance(images, ImageFiles) else ImageFiles(images)
    n = len(ds)
    if num is not None:
        if isinstance(num, bool) or not isinstance(num, int) or num < 2:
            raise ValueError(f"num must be an integer >= 2, got {num!r}")
        if num > n:
            raise ValueError(f"{ds.path}: holds {n} images, fewer than num={num} (lower --num)")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if n < 2:
        raise ValueError(f"{ds.path}: statistics need at least 2 images, got {n}")
    index = np.arange(n)
    if num is not None and num < n:
        np.random.RandomState(seed % (1 << 31)).shuffle(index)
        index = np.sort(index[:num])
    rank, world = _rank_world()
    mine = [index[b] for b in rank_batches(len(index), batch, rank, world)]
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=[b.tolist() for b in mine if len(b)],
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        pin_memory=torch.cuda.is_available(),
    )
    return stats_of_batches(loader, detectors, device=device, total=len(index), progress=progress)


def metrics_from_stats(stats: Mapping, ref: Mapping | str | os.PathLike) -> dict[str, float]:
    """``{metric: Frechet distance}`` for every metric present in both (``ref`` a dict or a file
    :func:`~autoguide_fast.metrics.load_ref` reads)."""
    if not isinstance(ref, Mapping):
        ref = load_ref(ref)
    out = {}
    for name, s in stats.items():
        if name == "num_images":
            continue
        if name not in ref:
            have = sorted(set(ref) - {"num_images"})
            raise ValueError(f"the reference has no '{name}' statistics (it has {have})")
        r = ref[name]
        if np.shape(r["mu"]) != np.shape(s["mu"]):
            raise ValueError(
                f"{name}: the reference has {np.size(r['mu'])} features, the detector {np.size(s['mu'])}"
            )
        out[name] = frechet_distance(s["mu"], s["sigma"], r["mu"], r["sigma"])
    return out


class FrechetMetric:
    """FID or FD_DINOv2 of image sets against a reference file, as a sweep metric:
    ``m(images, classes) -> {name: value}`` (the metric of ``experiment.sweep_denoisers``) or
    :meth:`of_batches` over streamed batches. ``identity`` names the detector file and the reference
    (file name, size, modification time) for cell caches."""

    def __init__(
        self,
        name: str,
        ref: str | os.PathLike,
        weights: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        batch: int = 64,
    ):
        path = weights_path(name, weights)
        self.name, self.batch, self.device = name, batch, device
        self.ref = load_ref(ref)
        if name not in self.ref:
            have = sorted(set(self.ref) - {"num_images"})
            raise ValueError(f"{ref}: holds no '{name}' statistics (it has {have})")
        self.detector = detector(name, path, device)
        self.identity = {"metric": name, "detector": file_identity(path), "ref": file_identity(ref)}

    def of_batches(self, batches: Iterable[torch.Tensor], total: int | None = None) -> dict[str, float]:
        stats = stats_of_batches(batches, {self.name: self.detector}, device=self.device, total=total)
        return metrics_from_stats(stats, self.ref)

    def __call__(self, images: torch.Tensor, classes=None) -> dict[str, float]:
        return self.of_batches(images.split(self.batch), total=len(images))
