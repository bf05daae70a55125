"""The digits experiment on the embedded digits set: a conditional main model (digits-s), a
smaller, shorter-trained guide (digits-xs) and an unconditional model for CFG, evaluated with no
guidance, CFG, CFG with a guidance interval and autoguidance over a grid of weights."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..checkpoint import load_network
from ..data import save_grid
from ..files import atomic_write_bytes, figure, save_figure, strict_json
from ..guidance import CFG, Autoguidance
from ..training import TrainOptions, train
from . import digits
from .sweep import evaluate_guidance

__all__ = ["digits_experiment"]


def _train_model(out: Path, preset: str, kimg: float, cond: bool, log) -> Path:
    snap_kimg = max(kimg / 8, 0.064)
    opts = TrainOptions(
        preset=preset,
        cond=cond,
        kimg=kimg,
        batch=128,
        snapshot_kimg=snap_kimg,
        checkpoint_kimg=snap_kimg,
        log_kimg=max(kimg / 50, 0.128),
        lr_decay_kimg=kimg / 4,
        rampup_kimg=kimg / 20,
        ema_stds=(0.05, 0.10),
    )
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
        table.append(
            f"| {name} | {r['weight']:g} | {r['fd']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['alignment']:.3f} |"
        )
    summary = dict(
        kimg=kimg,
        samples=n,
        steps=steps,
        interval=interval,
        results=results,
        best=best,
        eval_seconds=time.perf_counter() - t0,
    )
    atomic_write_bytes(out / "results.json", (strict_json(summary, indent=2) + "\n").encode())
    atomic_write_bytes(out / "table.md", ("\n".join(table) + "\n").encode())
    _figure(results, grids, best, out / "figure.png")
    log("\n".join(table))
    return summary


def _figure(results, grids, best, path):
    metrics = ["fd", "precision", "recall", "alignment"]
    fig = figure(figsize=(16, 8))
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
            ax.imshow(np.asarray(Image.open(Path(tmp) / "grid.png")), cmap="gray")
        ax.set_title(f"{name}, w={r['weight']:g}")
        ax.axis("off")
    save_figure(fig, path, dpi=90)
