"""The digits experiment over training seeds: which guide (size x training length x EMA) and
weight, found with the sweep tool, and whether autoguidance beats CFG beyond the noise.

For every training set ``k`` (seeds ``k``, ``100 + k``, ``200 + k``) it trains a conditional main
model (digits-s), conditional guides of every size in ``guide_presets`` (one run each, to half
the main model's length, with dense snapshots and the main model's learning-rate schedule, so
the run reconstructed post hoc at time t is the guide trained for t) and an unconditional model
for CFG. Then:

1. *search* on set 0: :func:`autoguide_fast.experiment.sweep` per guide size over guide EMA x
   guide length x weight, and CFG (with and without the guidance interval) over the weights;
2. *check* the best cell of each method, and no guidance, on every set with two disjoint seed
   sets: FD_digits as mean +- std over training sets, and the sampling noise of the FD itself
   (the difference between the two seed sets).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..checkpoint import load_network
from ..ema import list_snapshots, reconstruct
from ..files import atomic_write_bytes, figure, save_figure, strict_json
from ..guidance import CFG, Autoguidance
from ..training import TrainOptions, train
from . import digits
from .cells import CellCache
from .sweep import evaluate_guidance, snapshot_time, sweep

__all__ = ["QUICK_STUDY", "DigitsStudy", "digits_seeds"]


@dataclass(frozen=True)
class DigitsStudy:
    """What the study trains and tries (defaults: the digits experiment's sizes)."""

    main_kimg: float = 60.0
    guide_presets: tuple[str, ...] = ("digits-xs", "digits-xxs")
    guide_kimg: tuple[float, ...] = (7.5, 15.0, 30.0)  # guide lengths, from one run to the last
    guide_snapshot_kimg: float = 1.875
    ema_main: float = 0.10
    ema_guide: tuple[float, ...] = (0.05,)  # post hoc; 0.05 and 0.10 differ by < 1% in FD here
    weights: tuple[float, ...] = (1.1, 1.25, 1.5)  # FD doubles from 1.25 to 1.5 for a weak guide
    interval: tuple[float, float] = (0.28, 2.9)  # the digits experiment's guidance interval
    samples: int = 500  # per seed set; the check uses seeds [0, n) and [n, 2n)
    steps: int = 16


QUICK_STUDY = DigitsStudy(
    main_kimg=0.512,
    guide_presets=("digits-xxs",),
    guide_kimg=(0.128, 0.256),
    guide_snapshot_kimg=0.064,
    ema_guide=(0.10,),
    weights=(1.5, 2.0),
    samples=48,
    steps=4,
)


def _options(study: DigitsStudy, role: str, k: int):
    K = study.main_kimg
    common = dict(
        batch=128,
        lr_decay_kimg=K / 4,
        rampup_kimg=K / 20,
        ema_stds=(0.05, 0.10),
        checkpoint_kimg=K / 8,
        log_kimg=K / 50,
    )
    if role == "main":
        return TrainOptions(preset="digits-s", cond=True, kimg=K, snapshot_kimg=K / 8, seed=k, **common)
    if role == "uncond":
        return TrainOptions(
            preset="digits-xs", cond=False, kimg=K / 2, snapshot_kimg=K / 8, seed=200 + k, **common
        )
    return TrainOptions(
        preset=role,
        cond=True,
        kimg=max(study.guide_kimg),
        seed=100 + k,
        snapshot_kimg=study.guide_snapshot_kimg,
        **common,
    )


def _train_set(out: Path, study: DigitsStudy, k: int, log) -> dict[str, float]:
    seconds = {}
    for role in ("main", *study.guide_presets, "uncond"):
        t0 = time.perf_counter()
        result = train(
            "digits", out / f"set{k}" / role, _options(study, role, k), progress=False, log=lambda s: None
        )
        if result["status"] != "done":  # stopped by a signal: its checkpoint resumes the next run
            raise KeyboardInterrupt(f"training {out / f'set{k}' / role} was {result['status']}")
        seconds[role] = time.perf_counter() - t0
        log(f"set {k}: {role} ready ({seconds[role]:.0f} s)")
    return seconds


def _final(run: Path, std: float, folder: Path, nimg: int | None = None) -> Path:
    # The run reconstructed post hoc at EMA length std (at time nimg; None: its newest snapshot).

    return reconstruct(run, [std], nimg, out_dir=folder, progress=False)[0]


def _time(run: Path, kimg: float) -> int:
    # The snapshot time of a guide run that stands for the training length kimg (as sweep picks it).

    return snapshot_time(sorted({s.nimg for s in list_snapshots(run)}), kimg, run)


def _pm(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def digits_seeds(
    out: str | Path = "runs/digits-seeds",
    *,
    seeds: int = 3,
    quick: bool = False,
    study: DigitsStudy | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs the study (see the module docstring) in ``out``: trains what is missing (runs resume),
    reuses finished sweep cells and evaluations, and writes ``study.json``, ``study.md`` and
    ``study.png``. Returns the summary."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= 100:
        raise ValueError(f"seeds must be an integer in [1, 100] (training sets), got {seeds!r}")
    study = study or (QUICK_STUDY if quick else DigitsStudy())
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory, got the file {out}")
    t_start = time.perf_counter()
    train_seconds = [_train_set(out, study, k, log) for k in range(seeds)]
    t_train = time.perf_counter() - t_start
    classifier = digits.load_classifier()
    ref = digits.reference_stats(classifier)
    n, ws = study.samples, list(study.weights)

    # 1. Search on set 0: autoguidance with the sweep tool per guide size, CFG over the weights.
    t0 = time.perf_counter()
    set0 = out / "set0"
    cells = []
    for preset in study.guide_presets:
        sweep(
            set0 / "main",
            set0 / preset,
            ws,
            out / f"sweep-{preset}",
            ema_main=[study.ema_main],
            ema_guide=list(study.ema_guide),
            guide_kimg=list(study.guide_kimg),
            seeds=range(n),
            steps=study.steps,
            log=log,
        )
        doc = json.loads((out / f"sweep-{preset}" / "cells.json").read_text())["cells"]
        times = {round(_time(set0 / preset, kimg) / 1000, 6): kimg for kimg in study.guide_kimg}
        for c in doc.values():
            if (
                round(c.get("guide_kimg", -1), 6) in times
                and c["weight"] in ws
                and c["ema_guide"] in study.ema_guide
                and c["ema_main"] == study.ema_main
            ):
                cells.append(
                    dict(
                        c,
                        guide=preset,
                        guide_kimg=times[round(c["guide_kimg"], 6)],
                        snapshot_kimg=c["guide_kimg"],
                    )
                )
    identity = dict(study=asdict(study), seeds=seeds)
    cache = CellCache(out / "evaluations.json", json.loads(strict_json(identity)), log=log)
    models: dict[tuple, object] = {}

    def model(k: int, role: str, std: float, kimg: float | None = None):
        key = (k, role, std, kimg)
        if key not in models:
            run = out / f"set{k}" / role
            nimg = None if kimg is None else _time(run, kimg)
            folder = out / "phema" / f"set{k}-{role}-{std:g}" / ("last" if kimg is None else f"kimg{kimg:g}")
            models[key] = load_network(_final(run, std, folder, nimg))
        return models[key]

    def evaluate(k: int, method: str, w: float, guide: dict | None, seed0: int) -> dict:
        key = f"set{k}|{method}|w{w:g}|{json.dumps(guide, sort_keys=True)}|seeds{seed0}-{seed0 + n - 1}"

        def compute() -> dict:
            main = model(k, "main", study.ema_main)
            g = None
            if method == "autoguidance":
                g = Autoguidance(model(k, guide["guide"], guide["ema_guide"], guide["guide_kimg"]), w)
            elif method in ("cfg", "cfg_interval"):
                iv = study.interval if method == "cfg_interval" else None
                g = CFG(model(k, "uncond", 0.10), w, interval=iv)
            m, _ = evaluate_guidance(main, g, list(range(seed0, seed0 + n)), study.steps, ref, classifier)
            return m

        return cache.get(key, compute)

    search = {"autoguidance": cells}
    for method in ("cfg", "cfg_interval"):
        search[method] = [dict(weight=w, **evaluate(0, method, w, None, 0)) for w in ws]
    t_search = time.perf_counter() - t0
    best = {m: min(rows, key=lambda r: r["fd"]) for m, rows in search.items()}
    log("search (set 0): " + "; ".join(f"{m} w={r['weight']:g} FD {r['fd']:.3f}" for m, r in best.items()))

    # 2. Check the best cells, and no guidance, on every set with two disjoint seed sets.
    t0 = time.perf_counter()
    checks = {"none": (1.0, None)}
    for m, r in best.items():
        g = None
        if m == "autoguidance":
            g = dict(guide=r["guide"], ema_guide=r["ema_guide"], guide_kimg=r["guide_kimg"])
        checks[m] = (r["weight"], g)
    table = {}
    for m, (w, g) in checks.items():
        rows = [[evaluate(k, m, w, g, s0) for s0 in (0, n)] for k in range(seeds)]
        table[m] = dict(
            weight=w,
            guide=g,
            fd_a=[r[0]["fd"] for r in rows],
            fd_b=[r[1]["fd"] for r in rows],
            precision=[r[0]["precision"] for r in rows],
            recall=[r[0]["recall"] for r in rows],
            alignment=[r[0].get("alignment") for r in rows],
        )
    t_check = time.perf_counter() - t0
    # Differences to autoguidance, paired by training set and seed set.
    ag = np.array(table["autoguidance"]["fd_a"] + table["autoguidance"]["fd_b"])
    diffs = {
        m: (np.array(t["fd_a"] + t["fd_b"]) - ag).tolist() for m, t in table.items() if m != "autoguidance"
    }
    noise = [abs(a - b) / math.sqrt(2) for t in table.values() for a, b in zip(t["fd_a"], t["fd_b"])]
    seconds = dict(train=t_train, search=t_search, check=t_check, total=time.perf_counter() - t_start)
    summary = dict(
        seeds=seeds,
        study=asdict(study),
        best=best,
        search=search,
        check=table,
        diffs=diffs,
        sampling_noise=float(np.sqrt(np.mean(np.square(noise)))),
        train_seconds=train_seconds,
        seconds=seconds,
    )
    atomic_write_bytes(out / "study.json", (strict_json(summary, indent=1) + "\n").encode())
    text = _report(summary)
    atomic_write_bytes(out / "study.md", text.encode())
    _figure(summary, out / "study.png")
    log(text)
    return summary


def _report(s: dict) -> str:
    n, seeds = s["study"]["samples"], s["seeds"]
    lines = [
        f"# Digits over {seeds} training sets (FD_digits on {n} samples; mean ± std over sets)",
        "",
        "| method | weight | guide | FD (seeds A) | FD (seeds B) | precision | recall | FD - autoguidance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, t in s["check"].items():
        g = t["guide"]
        guide = "-" if g is None else f"{g['guide']}, {g['guide_kimg']:g} kimg, EMA {g['ema_guide']:g}"
        diff = "-" if m == "autoguidance" else _pm(s["diffs"][m])
        lines.append(
            f"| {m} | {t['weight']:g} | {guide} | {_pm(t['fd_a'])} | {_pm(t['fd_b'])} | "
            f"{_pm(t['precision'])} | {_pm(t['recall'])} | {diff} |"
        )
    lines += [
        "",
        f"Sampling noise of one FD (|FD_A - FD_B| / sqrt 2, rms over cells): {s['sampling_noise']:.3f}.",
        "The last column pairs each method with autoguidance on the same training set and seed set "
        "(positive: autoguidance is better).",
        "",
        "## Search on set 0 (autoguidance: the sweep tool; best 10 cells)",
        "",
        "| guide | guide kimg | guide EMA | weight | FD | precision | recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in sorted(s["search"]["autoguidance"], key=lambda c: c["fd"])[:10]:
        lines.append(
            f"| {c['guide']} | {c['guide_kimg']:g} | {c['ema_guide']:g} | {c['weight']:g} | "
            f"{c['fd']:.3f} | {c['precision']:.3f} | {c['recall']:.3f} |"
        )
    t = s["seconds"]
    lines += [
        "",
        f"Time: {t['total']:.0f} s (training {t['train']:.0f} s, search {t['search']:.0f} s, "
        f"check {t['check']:.0f} s).",
        "",
    ]
    return "\n".join(lines)


def _figure(s: dict, path: Path) -> None:
    fig = figure(figsize=(14, 5))
    ax, ax2 = fig.subplots(1, 2)
    for preset in s["study"]["guide_presets"]:
        for kimg in s["study"]["guide_kimg"]:
            rows = [
                c for c in s["search"]["autoguidance"] if c["guide"] == preset and c["guide_kimg"] == kimg
            ]
            if not rows:
                continue
            best_ema = min(rows, key=lambda c: c["fd"])["ema_guide"]
            rows = sorted((c for c in rows if c["ema_guide"] == best_ema), key=lambda c: c["weight"])
            ax.plot(
                [c["weight"] for c in rows],
                [c["fd"] for c in rows],
                "o-",
                label=f"autoguidance {preset} {kimg:g} kimg EMA {best_ema:g}",
            )
    for m in ("cfg", "cfg_interval"):
        rows = s["search"][m]
        color = "k" if m == "cfg" else "grey"
        ax.plot([r["weight"] for r in rows], [r["fd"] for r in rows], "s--", color=color, label=m)
    ax.set_xlabel("guidance weight")
    ax.set_ylabel("FD_digits (set 0, lower is better)")
    ax.set_title("Search on training set 0")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    names = list(s["check"])
    for i, m in enumerate(names):
        t = s["check"][m]
        for j, key in enumerate(("fd_a", "fd_b")):
            v = t[key]
            ax2.scatter(
                [i + (j - 0.5) * 0.15] * len(v),
                v,
                color=f"C{j}",
                s=18,
                label=None if i else f"seeds {'AB'[j]}",
            )
        allv = t["fd_a"] + t["fd_b"]
        ax2.errorbar(
            i + 0.3, np.mean(allv), yerr=np.std(allv, ddof=1) if len(allv) > 1 else 0, fmt="k_", capsize=4
        )
    ax2.set_xticks(range(len(names)), [f"{m}\nw={s['check'][m]['weight']:g}" for m in names])
    ax2.set_ylabel("FD_digits")
    ax2.set_title(f"Best cells on {s['seeds']} training sets x 2 seed sets (bar: mean ± std)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
