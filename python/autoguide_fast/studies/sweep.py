"""Guidance sweeps: which guide, which weight, which EMA lengths.

- :func:`sweep`: autoguidance over snapshots and run directories (guide weight x EMA lengths x
  guide training length, post-hoc EMA), scored with FD_digits, FID or FD_DINOv2; resumable.
- :func:`sweep_denoisers`: guides x weights over any denoisers with the caller's metric; resumable.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import __version__, checks
from ..checkpoint import load_network, read_metadata
from ..data import save_grid
from ..ema import list_snapshots, reconstruct, std_to_exp
from ..files import atomic_write_bytes, file_identity, remove_stale_temporaries, strict_json
from ..generation import Batch, compact_seeds, generate
from ..guidance import Autoguidance
from ..interop.official import is_official_pickle
from ..interop.vae import load_vae
from ..metrics import FrechetMetric
from ..sampling import sigma_range
from . import digits
from .cells import CellCache, cell_key
from .plots import contact_sheet, heatmap

__all__ = ["evaluate_guidance", "snapshot_time", "sweep", "sweep_denoisers"]


def _samples(net, guidance, seeds, steps, **options) -> Batch:
    # All of seeds' images in one Batch; options go to generate (default: batches of 500 on the CPU).
    options = {"batch": 500, "device": "cpu", **options}
    batches = list(generate(net, seeds, guidance=guidance, steps=steps, **options))
    classes = None if batches[0].classes is None else torch.cat([b.classes for b in batches])
    return Batch(sum((b.seeds for b in batches), []), torch.cat([b.images for b in batches]), classes)


def evaluate_guidance(net, guidance, seeds, steps, ref, classifier) -> tuple[dict[str, float], torch.Tensor]:
    """Generates ``seeds`` with ``guidance`` and returns the digits metrics and the images."""
    b = _samples(net, guidance, seeds, steps)
    return digits.evaluate(b.images, b.classes, ref=ref, classifier=classifier), b.images


def _network_shape(path: Path) -> tuple | None:
    """(img_resolution, img_channels, label_dim) from a snapshot's (or a run's newest snapshot's)
    header; None for official pickles (read in full only when used)."""
    if path.is_dir():
        path = list_snapshots(path)[-1].path
    if path.suffix.lower() != ".safetensors":
        return None
    config = json.loads(read_metadata(path).get("config", "{}"))
    return tuple(config.get(k) for k in ("img_resolution", "img_channels", "label_dim"))


def _check_same_data_shape(main: Path, guide: Path) -> None:
    # Checked before the sweep's folder is created: a guide of other images is no guide.
    a, b = _network_shape(main), _network_shape(guide)
    if a is not None and b is not None and a != b:
        raise ValueError(
            f"main and guide must make the same samples: main {main.name} is (resolution, channels, "
            f"classes) {a}, guide {guide.name} {b}"
        )


def _source(path, stds, tag: str) -> tuple[Path, list[float | None], dict]:
    """Checks a sweep's model argument before anything is written: a snapshot file (no EMA
    lengths) or a run directory with snapshots (EMA lengths reconstructed post hoc). Returns the
    path, the EMA lengths ([None] for a file) and what identifies the model in the cache."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{tag} model {path}: no such file or directory (give a snapshot or a run directory)"
        )
    if path.is_dir():
        if not stds:
            raise ValueError(f"{path} is a directory: pass EMA lengths to reconstruct (--ema-{tag})")
        stds = sorted({float(s) for s in stds})
        for s in stds:
            std_to_exp(s)  # ValueError naming the bad width
        snaps = list_snapshots(path)
        if not snaps:
            raise ValueError(
                f"{tag} run directory {path} holds no network snapshots to reconstruct EMA lengths from"
            )
        return path, stds, dict(path=str(path.resolve()), snapshots=[file_identity(s.path) for s in snaps])
    if not path.is_file():
        raise ValueError(f"{tag} model {path} is not a regular file")
    if not is_official_pickle(path) and "arch" not in read_metadata(path):  # the header, checked
        raise ValueError(f"{tag} model {path} is not a network snapshot (its metadata has no 'arch')")
    if stds:
        raise ValueError(
            f"ema_{tag} (--ema-{tag}) reconstructs EMA lengths from a run directory, "
            f"but {tag} is the file {path}"
        )
    return path, [None], dict(path=str(path.resolve()), file=file_identity(path))


def _models(source: Path, stds: list, out_dir: Path, out_nimg: int | None = None) -> dict:
    # {EMA length: snapshot file}: a file as it is ({None: file}), a run directory's lengths
    # reconstructed post hoc into out_dir (at training time out_nimg; None: the newest snapshot).

    if stds == [None]:
        return {None: source}
    return dict(zip(stds, reconstruct(source, stds, out_nimg, out_dir=out_dir, progress=False)))


def snapshot_time(times: Sequence[int], kimg: float, run) -> int:
    """The snapshot time (nimg) of a run nearest to ``kimg`` (a snapshot is written on the first
    step past each interval, so its time is a batch or so after the round number). ValueError when
    the run has no snapshot within half a snapshot interval of it."""
    times = sorted(times)
    target = kimg * 1000
    best = min(times, key=lambda t: (abs(t - target), t))
    spacing = float(np.median(np.diff(times))) if len(times) > 1 else float(times[0])
    if abs(best - target) > 0.5 * spacing:
        raise ValueError(
            f"guide_kimg {kimg:g}: the guide run {run} has no snapshot near {kimg:g} kimg (its "
            f"{len(times)} snapshots run from {times[0] / 1000:g} to {times[-1] / 1000:g} kimg)"
        )
    return best


def _training_times(run: Path, kimgs, stds) -> list[int | None]:
    """The training times (nimg) at which a guide run directory is reconstructed: for each of
    ``kimgs``, the snapshot time nearest to it (:func:`snapshot_time`). ``[None]`` (the newest
    snapshot) without ``kimgs``."""
    if kimgs is None:
        return [None]
    kimgs = list(kimgs)
    if stds == [None]:
        raise ValueError(f"guide_kimg (--guide-kimg) needs a guide run directory, got the file {run}")
    if not kimgs or not all(isinstance(k, (int, float)) and math.isfinite(k) and k > 0 for k in kimgs):
        raise ValueError(f"guide_kimg must list training lengths > 0 in kimg, got {kimgs!r}")
    times = sorted({s.nimg for s in list_snapshots(run)})
    return list(dict.fromkeys(snapshot_time(times, k, run) for k in kimgs))


_CELLS_FORMAT = "autoguide_fast.sweep-cells/2"


def _checked_grid(weights, seeds, steps, out) -> tuple[list[float], list[int], Path]:
    """A sweep's weights, seeds, step count and output directory, checked before anything is
    created: (weights, seeds, out)."""
    ws = checks.weights("weights", weights)
    seeds = checks.seeds("seeds", seeds)
    checks.steps("steps", steps)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory, got the file {out}")
    return ws, seeds, out


def sweep(
    main: str | os.PathLike,
    guide: str | os.PathLike,
    weights: str | Sequence[float],
    out: str | os.PathLike,
    *,
    ema_main: Sequence[float] | None = None,
    ema_guide: Sequence[float] | None = None,
    guide_kimg: Sequence[float] | None = None,
    seeds: Sequence[int] = range(500),
    steps: int = 16,
    metric: str = "fd_digits",
    ref: str | os.PathLike | None = None,
    detector: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluates autoguidance for every (main EMA, guide EMA, guide training length, weight) with
    a fixed seed set. ``main``/``guide`` are snapshot files or run directories; with EMA lengths
    given, run directories are reconstructed post hoc, the guide at each training length in
    ``guide_kimg`` (the snapshot nearest to it; default: the newest snapshot). With a
    learning-rate schedule that does not depend on the run's length (the same ``lr_decay_kimg``
    and ``rampup_kimg``), a guide at time t of a longer run is the guide a run of length t makes.

    Finished cells are kept in ``cells.json``, keyed on everything that determines them (the
    models' files, EMA lengths, guide training time, weight, seeds, steps, metric, package
    version): a cell computed under other settings is recomputed, never reused. Every argument is
    checked before ``out`` is created. Writes ``table.md`` and ``heatmap.png``;
    returns the best setting. For in-memory models (diffusers UNets) and other metrics see
    :func:`sweep_denoisers`.

    ``metric``: ``'fd_digits'`` (the digits feature space, with precision, recall and alignment),
    or ``'fid'`` / ``'fd_dinov2'`` as the official tools compute them against the statistics file
    ``ref`` (:func:`autoguide_fast.metrics.load_ref`), the detector from ``detector`` (a weight
    file; default: ``AUTOGUIDE_INCEPTION`` / ``AUTOGUIDE_DINOV2``). The detector file and the
    reference are part of the cell key."""
    # Every argument is checked before anything is created on disk.
    frechet = None
    if metric in ("fid", "fd_dinov2"):
        if ref is None:
            raise ValueError(f"metric {metric!r} needs ref, the reference statistics of the data set")
        frechet = FrechetMetric(metric, ref, detector)
    elif metric != "fd_digits":
        raise ValueError(f"metric must be 'fd_digits', 'fid' or 'fd_dinov2', got {metric!r}")
    elif ref is not None or detector is not None:
        raise ValueError("ref and detector are for metric 'fid' or 'fd_dinov2' (fd_digits has its own)")
    ws, seeds, out = _checked_grid(weights, seeds, steps, out)
    main, main_stds, main_id = _source(main, ema_main, "main")
    guide, guide_stds, guide_id = _source(guide, ema_guide, "guide")
    guide_times = _training_times(guide, guide_kimg, guide_stds)
    _check_same_data_shape(main, guide)

    # Cells of other settings stay in the file but are neither returned nor shown.
    common = dict(
        main=main_id,
        guide=guide_id,
        seeds=compact_seeds(seeds),
        steps=steps,
        metric=metric,
        version=__version__,
    )
    if frechet is not None:  # keys of fd_digits sweeps unchanged
        common["measure"] = frechet.identity

    def key(em, eg, gt, w) -> str:
        at = {} if gt is None else dict(guide_nimg=gt)  # keys of sweeps without lengths unchanged
        return cell_key(dict(common, ema_main=em, ema_guide=eg, weight=w, **at))

    plan = [
        (em, (eg, gt), w, key(em, eg, gt, w))
        for em in main_stds
        for gt in guide_times
        for eg in guide_stds
        for w in ws
    ]
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    cells_path = out / "cells.json"
    cells = CellCache(cells_path, format=_CELLS_FORMAT, log=log)
    todo = [p for p in plan if p[3] not in cells]
    if len(todo) < len(plan):
        log(f"{len(plan) - len(todo)} of {len(plan)} cells reused from {cells_path}")
    if todo and frechet is None:
        classifier = digits.load_classifier()
        digits_ref = digits.reference_stats(classifier)
    if todo:
        mains = _models(main, sorted({p[0] for p in todo}), out / "phema-main")
        guides = {}
        for gt in sorted({p[1][1] for p in todo}, key=lambda t: -1 if t is None else t):
            stds = sorted({p[1][0] for p in todo if p[1][1] == gt})
            folder = out / "phema-guide" / ("" if gt is None else f"nimg{gt:09d}")
            guides.update({(eg, gt): f for eg, f in _models(guide, stds, folder, gt).items()})
        for em, mp in mains.items():
            net = load_network(mp)
            for (eg, gt), gp in guides.items():
                pending = [(w, k) for e_m, e_g, w, k in todo if (e_m, e_g) == (em, (eg, gt))]
                g = load_network(gp) if pending else None
                at = {} if gt is None else dict(guide_kimg=gt / 1000)
                for w, k in pending:
                    if frechet is None:
                        m, _ = evaluate_guidance(
                            net, Autoguidance(g, w), seeds, steps, digits_ref, classifier
                        )
                    else:  # streamed: a cell's images are never held together
                        batches = generate(net, seeds, guidance=Autoguidance(g, w), steps=steps)
                        m = {"fd": frechet.of_batches(b.images for b in batches)[metric]}
                    cells.put(k, dict(ema_main=em, ema_guide=eg, weight=w, **at, **m))
                    where = "" if gt is None else f"@{gt / 1000:g}kimg"
                    shown = " ".join(f"{n}={m[n]:.3f}" for n in ("fd", "precision", "recall") if n in m)
                    log(f"main={em}|guide={eg}{where}|w={w:g}: {shown}")
    rows = [cells[k] for *_, k in plan]
    best = min(rows, key=lambda c: c["fd"])
    timed = guide_kimg is not None
    title = _METRIC_TITLES[metric]
    extra = " precision | recall | alignment |" if frechet is None else ""
    lines = [
        "| ema_main | ema_guide | " + ("guide_kimg | " if timed else "") + f"weight | {title} |" + extra,
        "|---" * (4 + timed + (3 if frechet is None else 0)) + "|",
    ]

    def label(r) -> str:
        # Plain snapshot files have no EMA length to show.
        parts = [
            f"{who} EMA {r[key]}"
            for who, key in (("main", "ema_main"), ("guide", "ema_guide"))
            if r[key] is not None
        ]
        parts += [f"guide @ {r['guide_kimg']:g} kimg"] if timed else []
        return " / ".join(parts) or "models as given"

    order = sorted(
        rows, key=lambda c: (str(c["ema_main"]), c.get("guide_kimg", 0), str(c["ema_guide"]), c["weight"])
    )
    for c in order:
        lines.append(
            f"| {c['ema_main']} | {c['ema_guide']} | "
            + (f"{c['guide_kimg']:g} | " if timed else "")
            + f"{c['weight']:g} | {c['fd']:.3f} |"
            + (
                ""
                if frechet is not None
                else f" {c['precision']:.3f} | {c['recall']:.3f} | "
                + (f"{c['alignment']:.3f} |" if "alignment" in c else "- |")  # unconditional: no alignment
            )
        )
    atomic_write_bytes(out / "table.md", ("\n".join(lines) + "\n").encode())
    values = {(label(r), r["weight"]): r["fd"] for r in rows}
    heatmap(values, list(dict.fromkeys(label(r) for r in order)), ws, out / "heatmap.png", title)
    log(f"best: {best}")
    return best


_METRIC_TITLES = {"fd_digits": "FD_digits", "fid": "FID", "fd_dinov2": "FD_DINOv2"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _metric_values(metric, images, classes, objective) -> dict[str, float]:
    values = metric(images, classes)
    if not isinstance(values, Mapping) or not all(isinstance(k, str) for k in values):
        raise TypeError(f"metric must return a dict of {{name: number}}, got {type(values).__name__}")
    try:
        values = {k: float(v) for k, v in values.items()}
    except (TypeError, ValueError):
        raise TypeError(f"metric must return a dict of {{name: number}}, got {values!r}") from None
    if objective not in values:
        raise ValueError(f"objective {objective!r} is not among the metric's values {sorted(values)}")
    return values


def sweep_denoisers(
    main,
    guides: Mapping[str, object],
    weights: str | Sequence[float],
    seeds: Sequence[int],
    out: str | os.PathLike,
    *,
    identity=None,
    metric: Callable[[torch.Tensor, torch.Tensor | None], Mapping[str, float]] | None = None,
    objective: str = "fd",
    minimize: bool = True,
    steps: int = 32,
    batch: int = 16,
    class_idx: int | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    vae: str | os.PathLike | torch.nn.Module | None = None,
    device: torch.device | str | None = None,
    thumbnails: int = 8,
    log: Callable[[str], None] = print,
) -> dict | None:
    """Autoguidance of ``main`` by every guide at every weight, with one seed set: which guide and
    which weight. Any denoisers ``generate`` takes (the package's networks, diffusers UNets
    through :func:`autoguide_fast.adapters.diffusers.denoiser`); one process.

    Each cell (guide, weight) is generated with :func:`autoguide_fast.generation.generate` (the
    same seeds, hence the same noise, for every cell), scored by ``metric`` and kept in
    ``out/cells.json`` with a grid of its first images (``out/grids/``). A cell is reused when a
    later call has the same settings: it is keyed on the guide's NAME, the weight, the seeds, the
    sampler settings, the metric's name, the package version and ``identity``. In-memory models
    are known only by the names given here and by ``identity``: change a name or ``identity``
    (e.g. the checkpoints' paths and the prompt) whenever the models or their conditioning change,
    or cells of the old models are reused. Every argument is checked before ``out`` is created.
    Writes ``table.md`` (every cell), ``contact_sheet.png`` (one grid per cell, guides by rows,
    weights by columns) and, with a metric, ``heatmap.png``.

    Args:
        main: the main model (D1).
        guides: {name: guide model (D0)}; names are file-name safe (letters, digits, ``._-``,
            at most 64). The paper's guide: a smaller and/or shorter-trained model of the same
            family with the same conditioning.
        weights: guidance weights, ``"lo:hi:step"``, ``"w1,w2"`` or numbers (1 = no guidance).
        seeds: distinct seeds, one image each.
        out: output directory (created).
        identity: JSON data identifying the models and their conditioning (see above).
        metric: ``metric(images, classes) -> {name: number}`` over all of a cell's images (uint8
            [N, C, H, W]) and classes ([N] or None), e.g. an FID against the user's reference
            set; None: no scores, only grids and the table (nothing is "best").
        objective, minimize: the metric value that picks the best cell, and its direction.
        steps, batch, class_idx, sigma_min, sigma_max, rho, vae, device: as in ``generate``
            (a VAE folder is loaded once).
        thumbnails: images per cell grid (the first seeds).
        log: progress lines.

    Returns:
        The best cell ``{"guide", "weight", "grid", **metric values}``, or None without a metric.
    """
    # Every argument is checked before anything is created on disk.
    if not isinstance(guides, Mapping) or not guides:
        raise TypeError(f"guides must be a non-empty mapping {{name: denoiser}}, got {guides!r}")
    for name, g in guides.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(
                f"guides: name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names files)"
            )
        if g is None or not callable(g):
            raise TypeError(f"guides[{name!r}] must be a denoiser, got {type(g).__name__}")
    ws, seeds, out = _checked_grid(weights, seeds, steps, out)
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be None or a callable (images, classes) -> dict, got {metric!r}")
    if not isinstance(objective, str) or not objective:
        raise ValueError(f"objective must be the name of a metric value, got {objective!r}")
    if not isinstance(minimize, bool):
        raise TypeError(f"minimize must be True or False, got {minimize!r}")
    if isinstance(thumbnails, bool) or not isinstance(thumbnails, int) or thumbnails < 1:
        raise ValueError(f"thumbnails must be a positive integer, got {thumbnails!r}")
    try:
        identity_json = json.loads(strict_json(identity, sort_keys=True))
    except (TypeError, ValueError):
        raise TypeError(
            f"identity must be JSON data (str, numbers, lists, dicts), got {identity!r}"
        ) from None
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        raise ValueError("sweep_denoisers runs in one process (the metric needs every image of a cell)")
    if isinstance(vae, (str, os.PathLike)):
        vae = load_vae(vae, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = dict(
        batch=batch,
        class_idx=class_idx,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        vae=vae,
        device=device,
    )
    for g in guides.values():  # generate checks models, options and VAE before it yields anything
        generate(main, seeds, guidance=Autoguidance(g, ws[0]), steps=steps, **options)
    sigma_min, sigma_max = sigma_range(main, sigma_min, sigma_max)
    metric_name = None
    if metric is not None:  # a FrechetMetric also names its detector file and reference
        name = getattr(metric, "__qualname__", type(metric).__qualname__)
        metric_name = f"{metric.__module__}.{name}"
        if getattr(metric, "identity", None) is not None:
            metric_name = [metric_name, metric.identity]
    common = dict(
        kind="denoisers",
        identity=identity_json,
        seeds=compact_seeds(seeds),
        steps=steps,
        class_idx=class_idx,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=float(rho),
        metric=metric_name,
        version=__version__,
    )
    plan = [(name, w, cell_key(dict(common, guide=name, weight=w))) for name in guides for w in ws]

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    cells_path = out / "cells.json"
    cells = CellCache(cells_path, format=_CELLS_FORMAT, log=log)
    reused = sum(k in cells and (out / str(cells[k].get("grid", ""))).is_file() for *_, k in plan)
    if reused:
        log(f"{reused} of {len(plan)} cells reused from {cells_path}")
    for name, w, k in plan:
        if k in cells and (out / str(cells[k].get("grid", ""))).is_file():
            continue
        b = _samples(main, Autoguidance(guides[name], w), seeds, steps, **options)
        grid = f"grids/{name}_w{w:g}_{k[:8]}.png"
        save_grid(b.images[:thumbnails], out / grid, columns=min(thumbnails, len(seeds), 4))
        values = {} if metric is None else _metric_values(metric, b.images, b.classes, objective)
        cells.put(k, dict(guide=name, weight=w, grid=grid, **values))
        log(f"guide={name} w={w:g}: " + (" ".join(f"{m}={v:.4g}" for m, v in values.items()) or grid))
    rows = [cells[k] for *_, k in plan]
    keys = list(dict.fromkeys(m for r in rows for m in r if m not in ("guide", "weight", "grid")))
    lines = [
        "| guide | weight | " + "".join(f"{m} | " for m in keys) + "grid |",
        "|---" * (len(keys) + 3) + "|",
    ]
    for r in rows:
        values = "".join("- | " if r.get(m) is None else f"{r[m]:.4g} | " for m in keys)
        lines.append(f"| {r['guide']} | {r['weight']:g} | {values}{r['grid']} |")
    atomic_write_bytes(out / "table.md", ("\n".join(lines) + "\n").encode())
    contact_sheet(rows, list(guides), ws, out, objective if metric is not None else None)
    scored = [r for r in rows if isinstance(r.get(objective), float) and math.isfinite(r[objective])]
    if metric is None or not scored:
        return None
    values = {(r["guide"], r["weight"]): r[objective] for r in rows}
    heatmap(values, list(guides), ws, out / "heatmap.png", objective, minimize)
    best = (min if minimize else max)(scored, key=lambda r: r[objective])
    log(f"best: guide={best['guide']} w={best['weight']:g} {objective}={best[objective]:.4g}")
    return best
