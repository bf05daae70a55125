"""Guidance experiments: the digits experiment on the embedded digits set (no guidance, CFG, CFG
with a guidance interval, autoguidance over a grid of weights), the guidance sweep over snapshots
(guide weight x EMA lengths, resumable) and the sweep over any denoisers (guides x weights with
the caller's metric, resumable)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from . import digits
from .checkpoint import atomic_write_bytes, file_identity, load_network, save_figure, strict_json
from .generation import Batch, generate
from .guidance import CFG, Autoguidance
from .metrics import FrechetMetric

__all__ = [
    "MAX_WEIGHTS",
    "digits_experiment",
    "evaluate_guidance",
    "parse_weights",
    "sweep",
    "sweep_denoisers",
]


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


def _train_model(out: Path, preset: str, kimg: float, cond: bool, log) -> Path:
    from .training import TrainOptions, train

    snap_kimg = max(kimg / 8, 0.064)
    opts = TrainOptions(preset=preset, cond=cond, kimg=kimg, batch=128, snapshot_kimg=snap_kimg,
                        checkpoint_kimg=snap_kimg, log_kimg=max(kimg / 50, 0.128), lr_decay_kimg=kimg / 4,
                        rampup_kimg=kimg / 20, ema_stds=(0.05, 0.10))  # fmt: skip
    t0 = time.perf_counter()
    train("digits", out, opts, progress=True, log=log)
    final = sorted(out.glob("network-snapshot-*-0.100.safetensors"))[-1]
    log(f"{out.name}: {preset}, {kimg:g} kimg, cond={cond}: {time.perf_counter() - t0:.0f} s -> {final.name}")
    return final


def digits_experiment(
    out: str | os.PathLike = "runs/digits",
    *,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Trains (or reuses) a conditional main model (digits-s), a smaller and shorter-trained
    conditional guide (digits-xs, a quarter of the images) and an unconditional model for CFG
    (digits-xs, half of the images), then evaluates no guidance, CFG, CFG with a guidance
    interval and autoguidance over a grid of weights. Writes ``results.json``, ``table.md`` and
    ``figure.png``."""
    out = Path(out)
    kimg = 2.0 if quick else 60.0
    n, steps = (200, 8) if quick else (1000, 16)
    weights = [1.5, 2.0] if quick else [1.25, 1.5, 2.0, 2.5, 3.0]
    main = load_network(_train_model(out / "main", "digits-s", kimg, True, log))
    guide = load_network(_train_model(out / "guide", "digits-xs", kimg / 4, True, log))
    uncond = load_network(_train_model(out / "uncond", "digits-xs", kimg / 2, False, log))
    classifier = digits.load_classifier()
    ref = digits.reference_stats(classifier)
    seeds = list(range(n))
    interval = (0.28, 2.9)  # the guidance interval paper's range for EDM2-S at 512, rescaled to sigma units
    methods = {"none": [(1.0, None)]}
    methods["cfg"] = [(w, CFG(uncond, w)) for w in weights]
    methods["cfg_interval"] = [(w, CFG(uncond, w, interval=interval)) for w in weights]
    methods["autoguidance"] = [(w, Autoguidance(guide, w)) for w in weights]
    results, grids = {}, {}
    t0 = time.perf_counter()
    for name, settings in methods.items():
        results[name] = []
        for w, g in settings:
            m, images = evaluate_guidance(main, g, seeds, steps, ref, classifier)
            results[name].append(dict(weight=w, **m))
            grids[(name, w)] = images[:64]
            log(f"{name:>13} w={w:<5g} " + " ".join(f"{k}={v:.3f}" for k, v in m.items()))
    best = {name: min(rows, key=lambda r: r["fd"]) for name, rows in results.items()}
    table = [
        "| method | best weight | FD_digits | precision | recall | alignment |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in best.items():
        table.append(f"| {name} | {r['weight']:g} | {r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
                     f"| {r['alignment']:.3f} |")  # fmt: skip
    summary = dict(kimg=kimg, samples=n, steps=steps, interval=interval, results=results, best=best,
                   eval_seconds=time.perf_counter() - t0)  # fmt: skip
    atomic_write_bytes(out / "results.json", (strict_json(summary, indent=2) + "\n").encode())
    atomic_write_bytes(out / "table.md", ("\n".join(table) + "\n").encode())
    _figure(results, grids, best, out / "figure.png")
    log("\n".join(table))
    return summary


def _figure(results, grids, best, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .generation import save_grid

    metrics = ["fd", "precision", "recall", "alignment"]
    fig = plt.figure(figsize=(16, 8))
    for i, m in enumerate(metrics):
        ax = fig.add_subplot(2, 4, i + 1)
        for name, rows in results.items():
            ws, vs = [r["weight"] for r in rows], [r[m] for r in rows]
            ax.plot(ws, vs, "o-" if len(rows) > 1 else "s", label=name)
        ax.set_title({"fd": "FD_digits (lower is better)"}.get(m, m))
        ax.set_xlabel("guidance weight")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    for i, (name, r) in enumerate(best.items()):
        ax = fig.add_subplot(2, 4, 5 + i)
        with tempfile.TemporaryDirectory() as tmp:  # save_grid's layout, read back as an image
            save_grid(grids[(name, r["weight"])], Path(tmp) / "grid.png", columns=8)
            ax.imshow(plt.imread(Path(tmp) / "grid.png"), cmap="gray")
        ax.set_title(f"{name}, w={r['weight']:g}")
        ax.axis("off")
    save_figure(fig, path, dpi=90)


MAX_WEIGHTS = 1000  # cells per (main EMA, guide EMA) pair: each one samples the whole seed set


def _checked_weights(ws: list[float], name: str, given) -> list[float]:
    if not ws:
        raise ValueError(f"{name} must name at least one weight, got {given!r}")
    for w in ws:
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(
                f"{name}: weights must be finite numbers >= 0 (1 = no guidance), got {w:g} in {given!r}"
            )
    ws = list(dict.fromkeys(ws))  # a repeated weight is one cell
    if len(ws) > MAX_WEIGHTS:
        raise ValueError(f"{name} {given!r} names {len(ws)} weights, more than {MAX_WEIGHTS}")
    return ws


def parse_weights(spec: str, name: str = "weights") -> list[float]:
    """``"lo:hi:step"`` (``hi`` included when the steps reach it) or ``"w1,w2,..."`` -> the
    distinct guidance weights, in order, at most :data:`MAX_WEIGHTS`. ValueError naming ``name``
    and ``spec`` otherwise (the grid's size is checked before it is built)."""
    text = str(spec)
    try:
        if ":" in text:
            lo, hi, step = (float(v) for v in text.split(":"))
        else:
            ws = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} must be 'lo:hi:step' or a comma list of numbers, got {text!r}") from None
    if ":" in text:
        if not all(math.isfinite(v) for v in (lo, hi, step)):
            raise ValueError(f"{name} {text!r}: lo, hi and step must be finite numbers")
        if step <= 0:
            raise ValueError(f"{name} {text!r}: step must be > 0, got {step:g}")
        if lo > hi:
            raise ValueError(f"{name} {text!r}: lo must be <= hi, got {lo:g} > {hi:g}")
        span = (hi - lo) / step  # may overflow to inf for a tiny step; the comparison still holds
        if not span < MAX_WEIGHTS:
            raise ValueError(
                f"{name} {text!r} makes more than {MAX_WEIGHTS} weights; use a larger step or a shorter range"
            )
        ws = [round(lo + i * step, 10) for i in range(math.floor(span + 1e-9) + 1)]
    return _checked_weights(ws, name, text)


def _network_shape(path: Path) -> tuple | None:
    """(img_resolution, img_channels, label_dim) from a snapshot's (or a run's newest snapshot's)
    header; None for official pickles (read in full only when used)."""
    from .checkpoint import read_metadata
    from .ema import list_snapshots

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
    from .checkpoint import read_metadata
    from .ema import list_snapshots, std_to_exp
    from .interop.official import is_official_pickle

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
    from .ema import reconstruct

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
    from .ema import list_snapshots

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


def _read_cells(path: Path, log) -> dict:
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log(f"{path}: unreadable ({e}); every cell is recomputed")
        return {}
    if not (
        isinstance(doc, dict) and doc.get("format") == _CELLS_FORMAT and isinstance(doc.get("cells"), dict)
    ):
        log(f"{path}: not a cache of this version (cells without their settings); every cell is recomputed")
        return {}
    return doc["cells"]


def _write_cells(path: Path, cells: dict) -> None:
    doc = dict(format=_CELLS_FORMAT, cells=cells)
    atomic_write_bytes(path, (strict_json(doc, indent=1) + "\n").encode())


def _cell_key(settings: dict) -> str:
    # A cell is keyed on everything that determines its numbers.
    return hashlib.sha256(strict_json(settings, sort_keys=True).encode()).hexdigest()[:24]


def _checked_grid(weights, seeds, steps, out) -> tuple[list[float], list[int], Path]:
    """A sweep's weights, seeds, step count and output directory, checked before anything is
    created: (weights, seeds, out)."""
    if isinstance(weights, str):
        ws = parse_weights(weights)
    else:
        try:
            ws = _checked_weights([float(w) for w in weights], "weights", list(weights))
        except TypeError:
            raise TypeError(f"weights must be a string or a sequence of numbers, got {weights!r}") from None
    seeds = list(seeds)
    if not seeds or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in seeds):
        raise ValueError(
            f"seeds must be a non-empty sequence of integers in [0, 2**63), got {len(seeds)} "
            f"starting {seeds[:4]!r}"
        )
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must not repeat")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
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
    from . import __version__
    from .checkpoint import remove_stale_temporaries
    from .generation import compact_seeds

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
    common = dict(main=main_id, guide=guide_id, seeds=compact_seeds(seeds), steps=steps, metric=metric,
                  version=__version__)  # fmt: skip
    if frechet is not None:  # keys of fd_digits sweeps unchanged
        common["measure"] = frechet.identity

    def key(em, eg, gt, w) -> str:
        at = {} if gt is None else dict(guide_nimg=gt)  # keys of sweeps without lengths unchanged
        return _cell_key(dict(common, ema_main=em, ema_guide=eg, weight=w, **at))

    plan = [(em, (eg, gt), w, key(em, eg, gt, w)) for em in main_stds for gt in guide_times
            for eg in guide_stds for w in ws]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    cells_path = out / "cells.json"
    cells = _read_cells(cells_path, log)
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
                    cells[k] = dict(ema_main=em, ema_guide=eg, weight=w, **at, **m)
                    _write_cells(cells_path, cells)
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
    _heatmap(values, list(dict.fromkeys(label(r) for r in order)), ws, out / "heatmap.png", title)
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
    from . import __version__
    from .checkpoint import remove_stale_temporaries
    from .generation import compact_seeds, save_grid
    from .sampling import sigma_range

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
        from .interop.vae import load_vae

        vae = load_vae(vae, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    options = dict(batch=batch, class_idx=class_idx, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                   vae=vae, device=device)  # fmt: skip
    for g in guides.values():  # generate checks models, options and VAE before it yields anything
        generate(main, seeds, guidance=Autoguidance(g, ws[0]), steps=steps, **options)
    sigma_min, sigma_max = sigma_range(main, sigma_min, sigma_max)
    metric_name = None
    if metric is not None:  # a FrechetMetric also names its detector file and reference
        name = getattr(metric, "__qualname__", type(metric).__qualname__)
        metric_name = f"{metric.__module__}.{name}"
        if getattr(metric, "identity", None) is not None:
            metric_name = [metric_name, metric.identity]
    common = dict(kind="denoisers", identity=identity_json, seeds=compact_seeds(seeds), steps=steps,
                  class_idx=class_idx, sigma_min=sigma_min, sigma_max=sigma_max, rho=float(rho),
                  metric=metric_name, version=__version__)  # fmt: skip
    plan = [(name, w, _cell_key(dict(common, guide=name, weight=w))) for name in guides for w in ws]

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    cells_path = out / "cells.json"
    cells = _read_cells(cells_path, log)
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
        cells[k] = dict(guide=name, weight=w, grid=grid, **values)
        _write_cells(cells_path, cells)
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
    _contact_sheet(rows, list(guides), ws, out, objective if metric is not None else None)
    scored = [r for r in rows if isinstance(r.get(objective), float) and math.isfinite(r[objective])]
    if metric is None or not scored:
        return None
    values = {(r["guide"], r["weight"]): r[objective] for r in rows}
    _heatmap(values, list(guides), ws, out / "heatmap.png", objective, minimize)
    best = (min if minimize else max)(scored, key=lambda r: r[objective])
    log(f"best: guide={best['guide']} w={best['weight']:g} {objective}={best[objective]:.4g}")
    return best


def _contact_sheet(rows, names, ws, out: Path, objective):
    # One panel per cell: guides by rows, weights by columns, each the cell's grid PNG.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(names), len(ws), figsize=(2.4 * len(ws) + 0.4, 2.2 * len(names) + 0.4),
                             squeeze=False)  # fmt: skip
    for r in rows:
        ax = axes[names.index(r["guide"]), ws.index(r["weight"])]
        ax.imshow(plt.imread(out / r["grid"]), cmap="gray")
        score = r.get(objective) if objective else None
        title = f"{r['guide']} w={r['weight']:g}" + ("" if score is None else f"\n{objective}={score:.4g}")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    save_figure(fig, out / "contact_sheet.png", dpi=100)


def _heatmap(values: dict, names: list[str], ws: list[float], path: Path, label: str, minimize: bool = True):
    # values: {(row name, weight): number or None}; rows in the order of names, columns of ws.
    # The better end of the colour map is the lighter one; the best cell is outlined.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.full((len(names), len(ws)), np.nan)
    for (name, w), v in values.items():
        grid[names.index(name), ws.index(w)] = np.nan if v is None else v
    fig, ax = plt.subplots(figsize=(1.2 * len(ws) + 4, 0.6 * len(names) + 2))
    im = ax.imshow(grid, cmap="viridis_r" if minimize else "viridis", aspect="auto")
    ax.set_xticks(range(len(ws)), [f"{w:g}" for w in ws])
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("guidance weight")
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    for i in range(len(names)):
        for j in range(len(ws)):
            if not np.isnan(grid[i, j]):
                light = (grid[i, j] < lo + 0.5 * (hi - lo)) == minimize
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="k" if light else "w",
                    fontsize=8,
                )
    best = np.unravel_index(np.nanargmin(grid) if minimize else np.nanargmax(grid), grid.shape)
    ax.add_patch(
        plt.Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
    )
    ax.set_title(f"{label}: {'lower' if minimize else 'higher'} is better (best outlined)", fontsize=10)
    fig.colorbar(im, label=label, fraction=0.05, pad=0.02)
    save_figure(fig, path, dpi=100)
