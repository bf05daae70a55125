"""Guidance experiments on the embedded digits set: the digits experiment (no guidance, CFG,
CFG with a guidance interval, autoguidance over a grid of weights) and the guidance sweep
(guide weight x EMA lengths, resumable)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import digits
from .checkpoint import atomic_path, atomic_write_bytes, load_network, strict_json
from .generation import Batch, generate
from .guidance import CFG, Autoguidance

__all__ = ["MAX_WEIGHTS", "digits_experiment", "evaluate_guidance", "parse_weights", "sweep"]


def _samples(net, guidance, seeds, steps) -> Batch:
    batches = list(generate(net, seeds, guidance=guidance, batch=500, steps=steps, device="cpu"))
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
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


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


def _file_id(path: Path) -> list:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


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
        return path, stds, dict(path=str(path.resolve()), snapshots=[_file_id(s.path) for s in snaps])
    if not path.is_file():
        raise ValueError(f"{tag} model {path} is not a regular file")
    if not is_official_pickle(path) and "arch" not in read_metadata(path):  # the header, checked
        raise ValueError(f"{tag} model {path} is not a network snapshot (its metadata has no 'arch')")
    if stds:
        raise ValueError(
            f"ema_{tag} (--ema-{tag}) reconstructs EMA lengths from a run directory, "
            f"but {tag} is the file {path}"
        )
    return path, [None], dict(path=str(path.resolve()), file=_file_id(path))


def _models(source: Path, stds: list, out_dir: Path) -> dict:
    # {EMA length: snapshot file}: a file as it is ({None: file}), a run directory's lengths
    # reconstructed post hoc into out_dir.
    from .ema import reconstruct

    if stds == [None]:
        return {None: source}
    return dict(zip(stds, reconstruct(source, stds, out_dir=out_dir, progress=False)))


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


def sweep(
    main: str | os.PathLike,
    guide: str | os.PathLike,
    weights: str | Sequence[float],
    out: str | os.PathLike,
    *,
    ema_main: Sequence[float] | None = None,
    ema_guide: Sequence[float] | None = None,
    seeds: Sequence[int] = range(500),
    steps: int = 16,
    metric: str = "fd_digits",
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluates autoguidance for every (main EMA, guide EMA, weight) with a fixed seed set.
    ``main``/``guide`` are snapshot files or run directories; with EMA lengths given, run
    directories are reconstructed post hoc. Finished cells are kept in ``cells.json``, keyed on
    everything that determines them (the models' files, EMA length, weight, seeds, steps, metric,
    package version): a cell computed under other settings is recomputed, never reused. Every
    argument is checked before ``out`` is created. Writes ``table.md`` and ``heatmap.png``;
    returns the best setting."""
    from . import __version__
    from .checkpoint import remove_stale_temporaries
    from .generation import compact_seeds

    # Every argument is checked before anything is created on disk.
    if metric != "fd_digits":
        raise ValueError(f"metric must be 'fd_digits' (the digits feature space), got {metric!r}")
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
    main, main_stds, main_id = _source(main, ema_main, "main")
    guide, guide_stds, guide_id = _source(guide, ema_guide, "guide")

    # A cell is keyed on everything that determines its numbers; cells of other settings stay in
    # the file but are neither returned nor shown.
    common = dict(main=main_id, guide=guide_id, seeds=compact_seeds(seeds), steps=steps, metric=metric,
                  version=__version__)  # fmt: skip

    def key(em, eg, w) -> str:
        settings = dict(common, ema_main=em, ema_guide=eg, weight=w)
        return hashlib.sha256(strict_json(settings, sort_keys=True).encode()).hexdigest()[:24]

    plan = [(em, eg, w, key(em, eg, w)) for em in main_stds for eg in guide_stds for w in ws]
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    cells_path = out / "cells.json"
    cells = _read_cells(cells_path, log)
    todo = [p for p in plan if p[3] not in cells]
    if todo:
        classifier = digits.load_classifier()
        ref = digits.reference_stats(classifier)
        mains = _models(main, sorted({p[0] for p in todo}), out / "phema-main")
        guides = _models(guide, sorted({p[1] for p in todo}), out / "phema-guide")
        for em, mp in mains.items():
            net = load_network(mp)
            for eg, gp in guides.items():
                pending = [(w, k) for e_m, e_g, w, k in todo if (e_m, e_g) == (em, eg)]
                g = load_network(gp) if pending else None
                for w, k in pending:
                    m, _ = evaluate_guidance(net, Autoguidance(g, w), seeds, steps, ref, classifier)
                    cells[k] = dict(ema_main=em, ema_guide=eg, weight=w, **m)
                    doc = dict(format=_CELLS_FORMAT, cells=cells)
                    atomic_write_bytes(cells_path, (strict_json(doc, indent=1) + "\n").encode())
                    log(f"main={em}|guide={eg}|w={w:g}: fd={m['fd']:.3f} precision={m['precision']:.3f} "
                        f"recall={m['recall']:.3f}")  # fmt: skip
    rows = [cells[k] for *_, k in plan]
    best = min(rows, key=lambda c: c["fd"])
    lines = [
        "| ema_main | ema_guide | weight | FD_digits | precision | recall | alignment |",
        "|---" * 7 + "|",
    ]
    for c in sorted(rows, key=lambda c: (str(c["ema_main"]), str(c["ema_guide"]), c["weight"])):
        lines.append(
            f"| {c['ema_main']} | {c['ema_guide']} | {c['weight']:g} | {c['fd']:.3f} "
            f"| {c['precision']:.3f} | {c['recall']:.3f} | "
            + (f"{c['alignment']:.3f} |" if "alignment" in c else "- |")  # unconditional: no alignment
        )
    atomic_write_bytes(out / "table.md", ("\n".join(lines) + "\n").encode())
    _heatmap(rows, ws, out / "heatmap.png")
    log(f"best: {best}")
    return best


def _heatmap(rows, ws, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = sorted({(str(r["ema_main"]), str(r["ema_guide"])) for r in rows})
    grid = np.full((len(pairs), len(ws)), np.nan)
    for r in rows:
        grid[pairs.index((str(r["ema_main"]), str(r["ema_guide"]))), ws.index(r["weight"])] = r["fd"]
    fig, ax = plt.subplots(figsize=(1.2 * len(ws) + 3, 0.6 * len(pairs) + 2))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(ws)), [f"{w:g}" for w in ws])
    ax.set_yticks(range(len(pairs)), [f"main {a} / guide {b}" for a, b in pairs])
    ax.set_xlabel("guidance weight")
    for i in range(len(pairs)):
        for j in range(len(ws)):
            if not np.isnan(grid[i, j]):
                light = grid[i, j] < np.nanmin(grid) + 0.5 * (np.nanmax(grid) - np.nanmin(grid))
                ax.text(
                    j,
                    i,
                    f"{grid[i, j]:.2f}",
                    ha="center",
                    va="center",
                    color="k" if light else "w",
                    fontsize=8,
                )
    fig.colorbar(im, label="FD_digits")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
