"""A search for the best autoguidance guide on the 2D toy, over several training seeds.

The toy is where a guide trains in seconds, so the paper's degrees of freedom can be searched
outright: guide capacity (depth x width), guide training length, guide EMA length, guidance
weight and guidance interval. Every point is measured on ``seeds`` independent training sets
(the sets of :func:`autoguide_fast.toy.run`: their own main model, guide seeds and noise), and is
reported as mean +- standard deviation over the sets.

Two stages keep it affordable on a CPU:

1. *screen*: every guide (capacity x length x EMA) at a few weights, no interval, on fewer samples;
2. *final*: the best guides (by the mean of :func:`margin`), plus the paper's guide, at every
   weight and interval on the full sample count, next to CFG (same weights and intervals) and no
   guidance.

One training run per (capacity, set) gives every length and EMA: the learning-rate schedule does
not depend on the length, so the EMA copied at iteration ``t`` is the guide trained for ``t``
(:func:`autoguide_fast.toy.train_snapshots`). Finished cells are kept in ``cells.json``, so an
interrupted search resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import load_network, read_metadata, save_network
from ..files import atomic_write_bytes, figure, save_figure, strict_json
from ..guidance import CFG, Autoguidance
from ..sampling import sample
from .cells import CellCache
from .toy import (
    MAX_SETS,
    METRICS,
    QUICK,
    SEED_STRIDE,
    ToyRecipe,
    evaluate,
    initial_noise,
    load_set,
    mean_std,
    train_snapshots,
)

__all__ = ["QUICK_SPACE", "TARGET", "SearchSpace", "margin", "pareto_front", "search"]

# The moonshot: precision >= 0.95 with k-NN recall >= 0.93.
TARGET = {"precision": 0.95, "knn_recall": 0.93}


@dataclass(frozen=True)
class SearchSpace:
    """What the guide search tries (defaults sized for a 2-core CPU: about half an hour for 3 sets)."""

    capacities: tuple[tuple[int, int], ...] = ((4, 8), (4, 16), (4, 32), (4, 64), (2, 32))  # (layers, hidden)
    lengths: tuple[int, ...] = (128, 256, 512, 1024)  # guide training iterations
    ema_stds: tuple[float, ...] = (0.005, 0.010, 0.020, 0.050)  # guide EMA widths
    screen_weights: tuple[float, ...] = (2.0, 3.0)
    screen_samples: int = 4096
    finalists: int = 4  # (capacity, length) groups carried to the final stage, plus the paper's guide
    weights: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 4.0)
    # Guidance intervals (sigma_lo, sigma_hi); None guides at every noise level (sigma_max is 5).
    intervals: tuple[tuple[float, float] | None, ...] = (None, (0.0, 0.5), (0.1, 5.0))
    samples: int = 8192


QUICK_SPACE = SearchSpace(
    capacities=((4, 8), (4, 32)),
    lengths=(16, 50),
    ema_stds=(0.010, 0.050),
    screen_weights=(2.0,),
    screen_samples=256,
    finalists=1,
    weights=(2.0, 3.0),
    intervals=(None, (0.0, 0.5)),
    samples=512,
)
PAPER_GUIDE = (4, 32, 512, 0.010)  # the paper's toy guide: 4 x 32, 512 iterations, EMA 0.010


def margin(m: dict[str, float]) -> float:
    """How far a result is from the moonshot corner :data:`TARGET` (the smaller of the two
    shortfalls; >= 0 means both targets are met). The search ranks guides by its mean over sets."""
    return min(m["precision"] - TARGET["precision"], m["knn_recall"] - TARGET["knn_recall"])


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (precision, recall) that no other point beats in both (ties kept),
    sorted by precision."""
    front = [
        i
        for i, (p, r) in enumerate(points)
        if not any((p2 >= p and r2 >= r) and (p2 > p or r2 > r) for p2, r2 in points)
    ]
    return sorted(front, key=lambda i: points[i])


def _guide_name(layers: int, hidden: int, iters: int, std: float) -> str:
    return f"{layers}x{hidden}-it{iters}-ema{std:g}"


def _interval_name(interval) -> str:
    return "all" if interval is None else f"{interval[0]:g}-{interval[1]:g}"


def _guides(root: Path, k: int, space: SearchSpace, recipe: ToyRecipe, progress: bool, log) -> dict:
    # {guide name: model} of training set k: one run per capacity, reused from root when complete.
    seed = SEED_STRIDE * k + 1  # the set's guide seed: 4 x 32 at 512 it / EMA 0.010 is its guide
    models = {}
    for layers, hidden in space.capacities:
        want = dict(layers=layers, hidden=hidden, batch_size=recipe.batch_size, seed=seed)
        names = {
            (t, s): _guide_name(layers, hidden, t, s)
            for t in space.lengths
            for s in map(float, space.ema_stds)
        }
        paths = {key: root / f"guide-{name}.safetensors" for key, name in names.items()}
        if all(p.is_file() and read_metadata(p).get("recipe") == json.dumps(want) for p in paths.values()):
            models.update({names[key]: load_network(p) for key, p in paths.items()})
            continue
        t0 = time.perf_counter()
        trained = train_snapshots(
            "A", layers, hidden, space.lengths, recipe.batch_size, seed, progress, ema_stds=space.ema_stds
        )
        seconds = time.perf_counter() - t0
        root.mkdir(parents=True, exist_ok=True)
        for key, net in trained.items():
            save_network(net, paths[key], recipe=want, train_seconds=seconds)
            models[names[key]] = net
        log(f"set {k}: trained guides {layers}x{hidden} to {max(space.lengths)} it in {seconds:.1f} s")
    return models


def _row(settings: dict, per_set: list[dict]) -> dict:
    stats = {m: mean_std([r[m] for r in per_set]) for m in METRICS}
    marg = mean_std([margin(r) for r in per_set])
    return dict(
        settings,
        mean={m: v[0] for m, v in stats.items()},
        std={m: v[1] for m, v in stats.items()},
        margin=marg[0],
        margin_std=marg[1],
        sets=len(per_set),
    )


def search(
    out: str | Path = "runs/toy",
    *,
    seeds: int = 3,
    quick: bool = False,
    space: SearchSpace | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Searches autoguidance guides on the toy over ``seeds`` training sets of the toy run in
    ``out`` (its main and CFG models are reused, or trained there). Writes ``out/search/``:
    ``search.json`` (every final row: settings, mean and std of every metric over sets),
    ``search.md`` (the tables) and ``pareto.png`` (precision vs k-NN recall of autoguidance, CFG and
    no guidance, with their Pareto fronts and +-1 std bars; and the screen: margin vs guide length
    per capacity). Returns the summary (``best``: the autoguidance row with the largest mean
    :func:`margin`)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SETS:
        raise ValueError(f"seeds must be an integer in [1, {MAX_SETS}] (training sets), got {seeds!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory, got the file {out}")
    recipe = QUICK if quick else ToyRecipe()
    space = space or (QUICK_SPACE if quick else SearchSpace())
    root = out / "search"
    root.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    sets = [load_set(out, k, quick=quick, progress=progress, log=log)[0] for k in range(seeds)]
    mains = [(out / f"set{k}" / "main.safetensors").stat().st_mtime_ns for k in range(seeds)]
    identity = dict(recipe=asdict(recipe), space=asdict(space), version=__version__, mains=mains)
    cells = CellCache(root / "cells.json", json.loads(strict_json(identity)), log=log)
    guides = [_guides(root / f"set{k}", k, space, recipe, progress, log) for k in range(seeds)]
    t_guides = time.perf_counter() - t_start

    def measure(k: int, kind: str, guide: str | None, w: float, interval, n: int) -> dict:
        key = f"set{k}|{kind}|{guide}|w{w:g}|{_interval_name(interval)}|n{n}"

        def compute() -> dict:
            noise = initial_noise(n, k, recipe.sigma_max)
            g = None
            if kind == "autoguidance":
                g = Autoguidance(guides[k][guide], w, interval=interval)
            elif kind == "cfg":
                g = CFG(sets[k]["uncond"], w, interval=interval)
            x = sample(sets[k]["main"], noise, guidance=g, steps=recipe.steps, sigma_max=recipe.sigma_max)
            return evaluate(x)

        return cells.get(key, compute)

    def bar(total: int, desc: str):
        return tqdm(total=total, desc=desc, unit="cell", disable=not progress)

    # 1. Screen every guide.
    names = [
        _guide_name(c[0], c[1], t, s)
        for c in space.capacities
        for t in space.lengths
        for s in map(float, space.ema_stds)
    ]
    t0 = time.perf_counter()
    screen = []
    with bar(len(names) * len(space.screen_weights) * seeds, "screen") as pbar:
        for name in names:
            for w in space.screen_weights:
                per_set = []
                for k in range(seeds):
                    per_set.append(measure(k, "autoguidance", name, w, None, space.screen_samples))
                    pbar.update()
                screen.append(_row(dict(method="autoguidance", guide=name, weight=w, interval=None), per_set))
    t_screen = time.perf_counter() - t0
    best_per_guide = {}
    for r in screen:
        if r["guide"] not in best_per_guide or r["margin"] > best_per_guide[r["guide"]]["margin"]:
            best_per_guide[r["guide"]] = r
    # One finalist per (capacity, length), with its best EMA: guides that differ only in their EMA
    # length measure alike here and would crowd out the other capacities and lengths.
    per_group = {}
    screen_best = sorted(best_per_guide.values(), key=lambda r: -r["margin"])
    for r in screen_best:
        per_group.setdefault(r["guide"].rsplit("-ema", 1)[0], r)
    finalists = [r["guide"] for r in list(per_group.values())[: space.finalists]]
    paper = _guide_name(*PAPER_GUIDE)
    if paper in names and paper not in finalists:
        finalists.append(paper)
    chosen = ", ".join(finalists)
    log(f"screen: {len(screen)} settings x {seeds} sets in {t_screen:.0f} s; finalists: {chosen}")

    # 2. Final: finalists, CFG and no guidance on the full sample count.
    t0 = time.perf_counter()
    plan = [("none", None, 1.0, None)]
    plan += [("cfg", None, w, iv) for w in space.weights for iv in space.intervals]
    plan += [("autoguidance", g, w, iv) for g in finalists for w in space.weights for iv in space.intervals]
    final = []
    with bar(len(plan) * seeds, "final") as pbar:
        for kind, guide, w, iv in plan:
            per_set = []
            for k in range(seeds):
                per_set.append(measure(k, kind, guide, w, iv, space.samples))
                pbar.update()
            final.append(_row(dict(method=kind, guide=guide, weight=w, interval=iv), per_set))
    t_final = time.perf_counter() - t0

    fronts = {}
    for kind in ("autoguidance", "cfg", "none"):
        rows = [r for r in final if r["method"] == kind]
        idx = pareto_front([(r["mean"]["precision"], r["mean"]["knn_recall"]) for r in rows])
        fronts[kind] = [rows[i] for i in idx]
    best = max((r for r in final if r["method"] == "autoguidance"), key=lambda r: r["margin"])
    best_cfg = max((r for r in final if r["method"] == "cfg"), key=lambda r: r["margin"])
    seconds = dict(guides=t_guides, screen=t_screen, final=t_final, total=time.perf_counter() - t_start)
    summary = dict(
        seeds=seeds,
        recipe=asdict(recipe),
        space=asdict(space),
        target=TARGET,
        finalists=finalists,
        best=best,
        best_cfg=best_cfg,
        seconds=seconds,
        fronts={k: [_settings(r) for r in v] for k, v in fronts.items()},
        final=final,
        screen=screen,
        screen_best=screen_best,
    )
    atomic_write_bytes(root / "search.json", (strict_json(summary, indent=1) + "\n").encode())
    text = _report(summary)
    atomic_write_bytes(root / "search.md", text.encode())
    _figure(final, fronts, screen, space, seeds, root / "pareto.png")
    log(text)
    log(f"wrote {root / 'search.md'}, {root / 'search.json'} and {root / 'pareto.png'}")
    return summary


def _settings(r: dict) -> str:
    if r["method"] == "none":
        return "no guidance"
    what = f"{r['method']} w={r['weight']:g} interval={_interval_name(r['interval'])}"
    return what + (f" guide {r['guide']}" if r["guide"] else "")


def _pm(r: dict, m: str) -> str:
    s = r["std"][m]
    return f"{r['mean'][m]:.3f}" + ("" if s is None else f" ± {s:.3f}")  # None: one set


def _table(rows: list[dict]) -> list[str]:
    lines = ["| setting | precision | k-NN precision | k-NN recall | branch TVD | margin |", "|---" * 6 + "|"]
    for r in rows:
        ms = "" if r["margin_std"] is None else f" ± {r['margin_std']:.3f}"
        cols = [_pm(r, m) for m in ("precision", "knn_precision", "knn_recall", "branch_tvd")]
        lines.append(f"| {_settings(r)} | " + " | ".join(cols) + f" | {r['margin']:+.3f}{ms} |")
    return lines


def _report(s: dict) -> str:
    best, final = s["best"], s["final"]
    met = best["margin"] >= 0
    lines = [
        f"# Guide search on the 2D toy ({s['seeds']} training sets; mean ± std over sets)",
        "",
        f"margin = min(precision - {TARGET['precision']}, k-NN recall - {TARGET['knn_recall']}) "
        f"(>= 0: the moonshot is met). Met by the best autoguidance setting: {'yes' if met else 'no'}.",
        "",
        "## Best settings",
        "",
        *_table([best, s["best_cfg"]] + [r for r in final if r["method"] == "none"]),
        "",
        "## Final stage, autoguidance (sorted by margin)",
        "",
        *_table(sorted((r for r in final if r["method"] == "autoguidance"), key=lambda r: -r["margin"])),
        "",
        "## Final stage, CFG",
        "",
        *_table(sorted((r for r in final if r["method"] == "cfg"), key=lambda r: -r["margin"])),
        "",
        "## Screen (every guide at its best screen weight, fewer samples, no interval)",
        "",
    ]
    lines += _table(s["screen_best"])
    t = s["seconds"]
    lines += [
        "",
        f"Time: {t['total']:.0f} s (guides {t['guides']:.0f} s, screen {t['screen']:.0f} s, "
        f"final {t['final']:.0f} s).",
        "",
    ]
    return "\n".join(lines)


def _figure(final, fronts, screen, space: SearchSpace, seeds: int, path: Path) -> None:
    fig = figure(figsize=(15, 6.5))
    ax, ax2 = fig.subplots(1, 2)
    style = {"autoguidance": ("tab:red", "o"), "cfg": ("tab:blue", "s"), "none": ("k", "*")}
    for kind, (color, marker) in style.items():
        rows = [r for r in final if r["method"] == kind]
        p = np.array([r["mean"]["precision"] for r in rows])
        rc = np.array([r["mean"]["knn_recall"] for r in rows])
        ps = [r["std"]["precision"] or 0.0 for r in rows]
        rs = [r["std"]["knn_recall"] or 0.0 for r in rows]
        label = {"autoguidance": "autoguidance", "cfg": "CFG", "none": "no guidance"}[kind]
        ax.errorbar(p, rc, xerr=ps, yerr=rs, fmt=marker, color=color, alpha=0.35, ms=4, lw=0.8)
        fp = [r["mean"]["precision"] for r in fronts[kind]]
        fr = [r["mean"]["knn_recall"] for r in fronts[kind]]
        ax.plot(fp, fr, marker + "-", color=color, ms=7, lw=1.6, label=f"{label} (Pareto front)")
    best = max(fronts["autoguidance"], key=lambda r: r["margin"])
    ax.annotate(
        _settings(best).replace(" guide ", "\nguide "),
        (best["mean"]["precision"], best["mean"]["knn_recall"]),
        xytext=(10, -30),
        textcoords="offset points",
        fontsize=7,
        arrowprops=dict(arrowstyle="->", lw=0.6),
    )
    ax.axvline(TARGET["precision"], color="g", ls="--", lw=0.8)
    ax.axhline(TARGET["knn_recall"], color="g", ls="--", lw=0.8, label="moonshot target")
    ax.set_xlabel("precision (share above the ground truth's 1% log-density quantile)")
    ax.set_ylabel("k-NN recall")
    ax.set_title(f"Final stage: every setting, mean ± std over {seeds} training sets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")

    for layers, hidden in space.capacities:
        pts = []
        for t in space.lengths:
            prefix = f"{layers}x{hidden}-it{t}-"
            rows = [r for r in screen if r["guide"].startswith(prefix)]
            if rows:  # the best EMA and weight at this capacity and length
                r = max(rows, key=lambda r: r["margin"])
                pts.append((t, r["margin"], r["margin_std"] or 0.0))
        if pts:
            t, m, e = zip(*pts)
            ax2.errorbar(t, m, yerr=e, marker="o", capsize=2, label=f"{layers} x {hidden}")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("guide training length (iterations)")
    ax2.set_ylabel("margin at the best EMA and weight, mean ± std")
    ax2.set_title("Screen: guide capacity and training length")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
