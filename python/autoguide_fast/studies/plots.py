"""The sweeps' figures: a contact sheet of every cell's grid and a heat map of a metric."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ..files import figure, save_figure

__all__ = ["contact_sheet", "heatmap"]


def contact_sheet(rows, names, ws, out: Path, objective):
    # One panel per cell: guides by rows, weights by columns, each the cell's grid PNG.
    fig = figure(figsize=(2.4 * len(ws) + 0.4, 2.2 * len(names) + 0.4))
    axes = fig.subplots(len(names), len(ws), squeeze=False)
    for r in rows:
        ax = axes[names.index(r["guide"]), ws.index(r["weight"])]
        ax.imshow(np.asarray(Image.open(out / r["grid"])), cmap="gray")
        score = r.get(objective) if objective else None
        title = f"{r['guide']} w={r['weight']:g}" + ("" if score is None else f"\n{objective}={score:.4g}")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    save_figure(fig, out / "contact_sheet.png", dpi=100)


def heatmap(values: dict, names: list[str], ws: list[float], path: Path, label: str, minimize: bool = True):
    # values: {(row name, weight): number or None}; rows in the order of names, columns of ws.
    # The better end of the colour map is the lighter one; the best cell is outlined.

    from matplotlib.patches import Rectangle  # heavy, and only this figure needs it

    grid = np.full((len(names), len(ws)), np.nan)
    for (name, w), v in values.items():
        grid[names.index(name), ws.index(w)] = np.nan if v is None else v
    fig = figure(figsize=(1.2 * len(ws) + 4, 0.6 * len(names) + 2))
    ax = fig.subplots()
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
    ax.add_patch(Rectangle((best[1] - 0.5, best[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_title(f"{label}: {'lower' if minimize else 'higher'} is better (best outlined)", fontsize=10)
    fig.colorbar(im, label=label, fraction=0.05, pad=0.02)
    save_figure(fig, path, dpi=100)
