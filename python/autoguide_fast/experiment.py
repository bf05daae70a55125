"""Guidance experiments on the embedded digits set: the digits experiment (no guidance, CFG,
CFG with a guidance interval, autoguidance over a grid of weights) and the guidance sweep
(guide weight x EMA lengths, resumable)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from . import digits
from .checkpoint import atomic_write_bytes, load_network
from .generation import Batch, generate
from .guidance import CFG, Autoguidance

__all__ = ["digits_experiment", "evaluate_guidance", "sweep"]


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
    atomic_write_bytes(out / "results.json", (json.dumps(summary, indent=2) + "\n").encode())
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
        tmp = Path(path).with_name(f".grid-{name}.png")
        save_grid(grids[(name, r["weight"])], tmp, columns=8)
        ax.imshow(plt.imread(tmp), cmap="gray")
        tmp.unlink()
        ax.set_title(f"{name}, w={r['weight']:g}")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _weights(spec: str) -> list[float]:
    try:
        if ":" in spec:
            lo, hi, step = (float(v) for v in spec.split(":"))
            return [round(lo + i * step, 10) for i in range(int(np.floor((hi - lo) / step + 1e-9)) + 1)]
        return [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(f"weights must be 'lo:hi:step' or a comma list, got {spec!r}") from None


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
    directories are reconstructed post hoc. Finished cells are kept in ``cells.json`` and not
    recomputed. Writes ``table.md`` and ``heatmap.png``; returns the best setting."""
    from .ema import reconstruct

    if metric != "fd_digits":
        raise ValueError(f"metric must be 'fd_digits' (the digits feature space), got {metric!r}")
    ws = _weights(weights) if isinstance(weights, str) else [float(w) for w in weights]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def models(source, stds, tag):
        source = Path(source)
        if source.is_file():
            return {None: source}
        if not stds:
            raise ValueError(f"{source} is a directory: pass EMA lengths to reconstruct (--ema-{tag})")
        paths = reconstruct(source, list(stds), out_dir=out / f"phema-{tag}", progress=False)
        return dict(zip(sorted(stds), paths))

    mains, guides = models(main, ema_main, "main"), models(guide, ema_guide, "guide")
    cells_path = out / "cells.json"
    cells = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    classifier = digits.load_classifier()
    ref = digits.reference_stats(classifier)
    for em, mp in mains.items():
        net = load_network(mp)
        for eg, gp in guides.items():
            g = load_network(gp)
            for w in ws:
                key = f"main={em}|guide={eg}|w={w:g}"
                if key in cells:
                    continue
                m, _ = evaluate_guidance(net, Autoguidance(g, w), list(seeds), steps, ref, classifier)
                cells[key] = dict(ema_main=em, ema_guide=eg, weight=w, **m)
                atomic_write_bytes(cells_path, json.dumps(cells, indent=1).encode())
                log(f"{key}: fd={m['fd']:.3f} precision={m['precision']:.3f} recall={m['recall']:.3f}")
    rows = [
        c for c in cells.values() if c["weight"] in ws and c["ema_main"] in mains and c["ema_guide"] in guides
    ]
    best = min(rows, key=lambda c: c["fd"])
    lines = [
        "| ema_main | ema_guide | weight | FD_digits | precision | recall | alignment |",
        "|---" * 7 + "|",
    ]
    for c in sorted(rows, key=lambda c: (str(c["ema_main"]), str(c["ema_guide"]), c["weight"])):
        lines.append(
            f"| {c['ema_main']} | {c['ema_guide']} | {c['weight']:g} | {c['fd']:.3f} "
            f"| {c['precision']:.3f} | {c['recall']:.3f} | {c['alignment']:.3f} |"
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
