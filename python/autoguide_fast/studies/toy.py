"""The 2D toy experiment of "Guiding a Diffusion Model with a Bad Version of Itself"
(Karras et al. 2024, Section 3 and Figure 1).

- :func:`ground_truth` (:mod:`.toy_mixture`): the tree-shaped class-conditional Gaussian mixtures
  ("A", "B", "AB"), with exact log-density, score and sampling at any noise level (Rust core).
- :func:`train`, :func:`train_snapshots` (:mod:`.toy_training`): the paper's toy training recipe
  (exact-score matching, Adam, power-function EMA).
- :func:`evaluate`: precision, k-NN precision/recall, mean log-density and branch coverage.
- :func:`run`: the whole experiment (three models, eight sampling methods, table and figure);
  ``autoguide toy`` on the command line.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import load_network, read_metadata, save_network
from ..files import atomic_write_bytes, figure, save_figure, strict_json
from ..guidance import CFG, Autoguidance
from ..metrics import knn_precision_recall, knn_radii
from ..networks.toy import ToyModel, torch_single_threaded
from ..sampling import sample
from .toy_mixture import CLASSES, COMPONENTS_PER_BRANCH, GaussianMixture, ground_truth
from .toy_training import EMA_STD, train, train_snapshots, train_together

__all__ = [
    "CLASSES",
    "EMA_STD",
    "GaussianMixture",
    "ToyRecipe",
    "evaluate",
    "ground_truth",
    "run",
    "train",
    "train_snapshots",
]


@functools.lru_cache(maxsize=8)
def _reference(classes: str, num_knn: int, num_threshold: int, seed: int) -> tuple[torch.Tensor, float]:
    gt = ground_truth(classes)
    gen = torch.Generator().manual_seed(seed)
    knn_ref = gt.sample(num_knn, 0, gen)
    threshold = torch.quantile(gt.logp(gt.sample(num_threshold, 0, gen).double()), 0.01)
    return knn_ref, float(threshold)


@functools.lru_cache(maxsize=8)
def _reference_radii(classes: str, num_knn: int, num_threshold: int, seed: int, k: int) -> torch.Tensor:
    # k-NN radii of the cached reference set, computed once per reference and k.
    return knn_radii(_reference(classes, num_knn, num_threshold, seed)[0], k)


def evaluate(
    samples: torch.Tensor,
    classes: str = "A",
    *,
    k: int = 3,
    num_knn_ref: int = 8192,
    num_threshold_ref: int = 65536,
    seed: int = 123,
) -> dict[str, float]:
    """Metrics of 2D ``samples`` [N, 2] against ``ground_truth(classes)``:

    - ``precision``: share of samples whose GT log-density is at least the 1% quantile of the
      GT log-density of ``num_threshold_ref`` GT samples;
    - ``knn_precision``, ``knn_recall``: Kynkaanniemi et al. (2019) with ``k`` neighbours
      against ``num_knn_ref`` GT samples;
    - ``mean_logp``: mean GT log-density of the samples;
    - ``branch_tvd``: total-variation distance between the samples' branch histogram (branch of
      the most responsible component) and the GT branch masses.
    """
    if not isinstance(samples, torch.Tensor) or samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must be a tensor [N, 2], got {getattr(samples, 'shape', type(samples))}")
    if not torch.isfinite(samples).all():
        raise ValueError("samples must be finite, got NaN or infinite values")
    gt = ground_truth(classes)
    ref, threshold = _reference(classes, num_knn_ref, num_threshold_ref, seed)
    samples = samples.detach().to("cpu", torch.float64)
    logp, _, comp = gt._eval(samples, 0)
    masses = gt.branch_masses()
    hist = torch.bincount(comp // COMPONENTS_PER_BRANCH, minlength=len(masses)).double() / len(samples)
    radii = _reference_radii(classes, num_knn_ref, num_threshold_ref, seed, k)
    knn_p, knn_r = knn_precision_recall(ref, samples.float(), k=k, real_radii=radii)
    return dict(
        precision=float((logp >= threshold).double().mean()),
        knn_precision=knn_p,
        knn_recall=knn_r,
        mean_logp=float(logp.mean()),
        branch_tvd=float(0.5 * (hist - masses).abs().sum()),
    )


@dataclass(frozen=True)
class ToyRecipe:
    """Sizes of the toy experiment (defaults: the paper's)."""

    main_iters: int = 4096
    guide_iters: int = 512
    batch_size: int = 4096
    main_hidden: int = 64
    guide_hidden: int = 32
    num_layers: int = 4
    num_samples: int = 8192
    steps: int = 32
    sigma_max: float = 5.0
    weights: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 4.0)


QUICK = ToyRecipe(main_iters=200, guide_iters=50, batch_size=512, num_samples=1024, steps=16)
METRICS = ("precision", "knn_precision", "knn_recall", "mean_logp", "branch_tvd")
# Training set k uses the seeds SEED_STRIDE * k + (0, 1, 2) for (main, guide, uncond) and samples
# with SEED_STRIDE * k + 1: set 0 is the single-seed experiment of earlier versions.
SEED_STRIDE = 10
MAX_SETS = 100


def _method_name(kind: str, w: float) -> str:
    return f"{kind}_w{w:g}"


def set_dir(out: str | Path, k: int) -> Path:
    """Where training set ``k`` of a toy run keeps its models (``main``, ``guide``, ``uncond``)."""
    return Path(out) / f"set{k}"


# Hidden features of the models trained as one stack, at most: a block's activations grow with
# models x hidden width, and 3 x 64 stays in the caches. So the main models (64) are stacked by 3,
# the guides (32) by 6 (measured on 2 cores, six 4x32 guides, 128 iterations: one stack of 6
# 5.8 s against two stacks of 3 7.3 s).
STACK_FEATURES = 192


def _models(out: Path, recipe: ToyRecipe, sets: Sequence[int], retrain: bool, progress: bool, log):
    """The models of training sets ``sets`` (reused from ``out/set<k>`` or trained there): per set
    ``({"main", "guide", "uncond"}: model, {name: training seconds})``. Models of one shape and
    length are trained together, up to ``STACK_FEATURES`` hidden features at a time, whatever
    their set."""
    spec = {
        "main": ("A", recipe.main_hidden, recipe.main_iters),
        "guide": ("A", recipe.guide_hidden, recipe.guide_iters),
        "uncond": ("AB", recipe.guide_hidden, recipe.guide_iters),
    }
    models: list[dict] = [{} for _ in sets]
    seconds: list[dict] = [{} for _ in sets]
    todo: dict[tuple[int, int], list] = {}
    for j, k in enumerate(sets):
        offset = SEED_STRIDE * k
        for i, (name, (classes, hidden, iters)) in enumerate(spec.items()):
            path = set_dir(out, k) / f"{name}.safetensors"
            want = dict(
                classes=classes,
                layers=recipe.num_layers,
                hidden=hidden,
                iters=iters,
                batch_size=recipe.batch_size,
                seed=offset + i,
            )
            if path.is_file() and not retrain and read_metadata(path).get("recipe") == json.dumps(want):
                models[j][name] = load_network(path)
                seconds[j][name] = float(read_metadata(path).get("train_seconds", "nan"))
                log(f"reusing {path}")
                continue
            todo.setdefault((hidden, iters), []).append((j, name, path, want))
    for (hidden, iters), planned in todo.items():
        size = max(1, STACK_FEATURES // hidden)
        for group in (planned[i : i + size] for i in range(0, len(planned), size)):
            t0 = time.perf_counter()
            runs = [(want["classes"], want["seed"]) for *_, want in group]
            layers, batch = recipe.num_layers, recipe.batch_size
            trained = train_together(runs, layers, hidden, [iters], batch, (EMA_STD,), progress)
            took = time.perf_counter() - t0
            names = ", ".join(f"{path} ({want['classes']}, seed {want['seed']})" for *_, path, want in group)
            log(f"trained {names} ({layers}x{hidden}, {iters} it) together in {took:.1f} s")
            for (j, name, path, want), snapshots in zip(group, trained):
                # Each model's share of the stack's time: the stack's models cost the same.
                seconds[j][name] = took / len(group)
                path.parent.mkdir(parents=True, exist_ok=True)
                models[j][name] = snapshots[(iters, EMA_STD)]
                save_network(models[j][name], path, recipe=want, train_seconds=seconds[j][name])
    return list(zip(models, seconds))


def load_set(
    out: str | Path, k: int, *, quick: bool = False, progress: bool = False, log=print
) -> tuple[dict[str, ToyModel], dict[str, float]]:
    """The three models of training set ``k`` of the toy run in ``out`` (trained there if missing):
    ``({"main", "guide", "uncond"}: model, {name: training seconds})``."""
    recipe = QUICK if quick else ToyRecipe()
    return _models(Path(out), recipe, [k], False, progress, log)[0]


def initial_noise(n: int, k: int, sigma_max: float) -> torch.Tensor:
    """Unit noise of training set ``k``: ``n`` samples of the class-A ground truth at ``sigma_max``
    divided by ``sigma_max`` (the paper starts its toy sampler from the diffused ground truth)."""
    gen = torch.Generator().manual_seed(SEED_STRIDE * k + 1)
    return ground_truth("A").sample(n, sigma_max, generator=gen) / sigma_max


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the deviation is None for a single value."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None


def run(
    out: str | Path = "runs/toy",
    *,
    seeds: int = 3,
    quick: bool = False,
    retrain: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """The toy experiment over ``seeds`` independent training sets: trains (or reuses) the main
    model, the autoguidance guide and the unconditional CFG guide of every set in ``out/set<k>``
    (seeds ``10 k``, ``10 k + 1``, ``10 k + 2``), samples every method from the class-A ground
    truth at ``sigma_max`` (noise seed ``10 k + 1``), and writes ``metrics.json`` (every set's
    metrics, their mean and standard deviation over sets) and ``figure.png`` (set 0's samples,
    metric-vs-weight curves with +-1 std bands). Returns the mean metrics per method."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not 1 <= seeds <= MAX_SETS:
        raise ValueError(f"seeds must be an integer in [1, {MAX_SETS}] (training sets), got {seeds!r}")
    recipe = QUICK if quick else ToyRecipe()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory, got the file {out}")
    out.mkdir(parents=True, exist_ok=True)
    sets, first = [], None
    for k, (models, seconds) in enumerate(_models(out, recipe, range(seeds), retrain, progress, log)):
        offset = SEED_STRIDE * k
        t0 = time.perf_counter()
        methods = _sample_methods(models, recipe, k, progress)
        metrics = {name: evaluate(x) for name, x in methods.items()}
        log(f"set {k}: sampled and evaluated {len(methods)} methods in {time.perf_counter() - t0:.1f} s")
        first = first or methods
        sets.append(
            dict(
                set=k,
                train_seeds=dict(main=offset, guide=offset + 1, uncond=offset + 2),
                noise_seed=offset + 1,
                train_seconds=seconds,
                metrics=metrics,
            )
        )
    names = list(sets[0]["metrics"])
    stats = {n: {m: mean_std([s["metrics"][n][m] for s in sets]) for m in METRICS} for n in names}
    mean = {n: {m: v[0] for m, v in ms.items()} for n, ms in stats.items()}
    std = {n: {m: v[1] for m, v in ms.items()} for n, ms in stats.items()}
    result = dict(recipe=asdict(recipe), seeds=seeds, metrics=mean, std=std, sets=sets)
    atomic_write_bytes(out / "metrics.json", (strict_json(result, indent=2) + "\n").encode())
    plot(first, out / "figure.png", mean=mean, std=std if seeds > 1 else None, seeds=seeds)
    log(format_table(mean, std if seeds > 1 else None))
    total = sum(sum(s["train_seconds"].values()) for s in sets)
    log(
        f"training time: {total:.1f} s over {seeds} set(s) (set 0: "
        f"{', '.join(f'{k} {v:.1f} s' for k, v in sets[0]['train_seconds'].items())})"
    )
    log(f"wrote {out / 'metrics.json'} and {out / 'figure.png'}")
    return mean


def _sample_methods(models, recipe: ToyRecipe, k: int, progress: bool) -> dict[str, torch.Tensor]:
    noise = initial_noise(recipe.num_samples, k, recipe.sigma_max)
    gen = torch.Generator().manual_seed(SEED_STRIDE * k + 2)
    methods: dict[str, torch.Tensor] = {"ground_truth": ground_truth("A").sample(recipe.num_samples, 0, gen)}
    runs = [("none", None)]
    for kind, cls, guide in (("autoguidance", Autoguidance, "guide"), ("cfg", CFG, "uncond")):
        runs += [(_method_name(kind, w), cls(models[guide], w)) for w in recipe.weights]
    # One labelled bar over the methods (set, method), not one unlabelled bar per sampler run.
    bar = tqdm(runs, desc=f"set {k}: sampling", unit="method", leave=False, disable=not progress)
    with torch_single_threaded(models["main"].uses_core):
        for name, guidance in bar:
            bar.set_postfix_str(name)
            methods[name] = sample(
                models["main"], noise, guidance=guidance, steps=recipe.steps, sigma_max=recipe.sigma_max
            )
    return methods


def format_table(metrics: dict[str, dict[str, float]], std: dict[str, dict[str, float]] | None = None) -> str:
    """Markdown table of :func:`evaluate` results, one row per method (``mean ± std`` when
    ``std`` is given)."""
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, m in metrics.items():
        cells = [f"{m[k]:.3f}" + (f" ± {std[name][k]:.3f}" if std else "") for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOT_WEIGHTS = (2.0, 3.0, 4.0)
CURVES = (
    ("precision", "precision (higher is better)"),
    ("knn_precision", "k-NN precision"),
    ("knn_recall", "k-NN recall (higher is better)"),
    ("branch_tvd", "branch TVD (lower is better)"),
)


def plot(
    methods: dict[str, torch.Tensor],
    path: str | Path,
    weight: float = 2.0,
    *,
    mean: dict[str, dict[str, float]] | None = None,
    std: dict[str, dict[str, float]] | None = None,
    seeds: int = 1,
) -> None:
    """Figure in the spirit of the paper's Figure 1: samples of the ground truth, no guidance,
    CFG and autoguidance (rows: guidance weights 2, 3, 4 where sampled) over the class-A
    outline; with ``mean`` (and ``std``), a third column of metric-vs-weight curves (bands: +-1
    standard deviation over ``seeds`` training sets; weight 1 is no guidance)."""
    sampled = sorted({float(n.rsplit("_w", 1)[1]) for n in methods if n.startswith("cfg_w")})
    weights = [w for w in sampled if w in PLOT_WEIGHTS] or sampled[:3] or [weight]
    gt = ground_truth("A")
    lo, hi = (gt.mu.min(0).values - 0.12).tolist(), (gt.mu.max(0).values + 0.12).tolist()
    grid = [torch.linspace(lo[d], hi[d], 300, dtype=torch.float64) for d in range(2)]
    gx, gy = torch.meshgrid(*grid, indexing="xy")
    logp = gt.logp(torch.stack([gx, gy], -1))
    _, threshold = _reference("A", 8192, 65536, 123)
    density = (logp - logp.max()).clamp(min=-12)

    panels = [[("ground_truth", "ground truth"), ("none", "no guidance")]]
    for w in weights:
        panels.append(
            [
                (_method_name("cfg", w), f"CFG w={w:g}"),
                (_method_name("autoguidance", w), f"autoguidance w={w:g}"),
            ]
        )
    rows, cols = max(len(panels), len(CURVES) if mean else 0), 3 if mean else 2
    fig = figure(figsize=(4 * cols, 4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for row, pair in zip(axes, panels):
        for ax, (key, title) in zip(row, pair):
            ax.set_visible(True)
            ax.imshow(
                density.numpy(), extent=(lo[0], hi[0], lo[1], hi[1]), origin="lower", cmap="Greys", alpha=0.35
            )
            ax.contour(
                gx.numpy(), gy.numpy(), logp.numpy(), levels=[threshold], colors="black", linewidths=0.6
            )
            if key in methods:
                pts = methods[key].numpy()
                ax.scatter(pts[:, 0], pts[:, 1], s=1.0, c="tab:red", alpha=0.5, linewidths=0)
            ax.set_title(title)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    if mean:
        for ax, (metric, title) in zip(axes[:, 2], CURVES):
            ax.set_visible(True)
            _curves(ax, metric, mean, std, sampled)
            ax.set_title(title)
        axes[0, 2].legend(fontsize=8)
    bands = f"; curves: mean and +-1 std over {seeds} training seeds" if mean and seeds > 1 else ""
    fig.suptitle(f"2D toy (class A): samples over the ground-truth outline (1% log-density quantile){bands}")
    save_figure(fig, path, dpi=110, rect=(0, 0, 1, 0.985))


def _curves(ax, metric: str, mean, std, weights: list[float]) -> None:
    # Metric vs weight for CFG and autoguidance (weight 1 = no guidance), bands of +-1 std.
    for kind, color in (("autoguidance", "tab:red"), ("cfg", "tab:blue")):
        names = ["none"] + [_method_name(kind, w) for w in weights]
        ws = np.array([1.0] + list(weights))
        m = np.array([mean[n][metric] for n in names])
        ax.plot(ws, m, "o-", color=color, label="CFG" if kind == "cfg" else kind, ms=3)
        if std:
            s = np.array([std[n][metric] for n in names], dtype=np.float64)
            if np.isfinite(s).all():
                ax.fill_between(ws, m - s, m + s, color=color, alpha=0.2, linewidth=0)
    ref = mean["ground_truth"][metric]
    ax.axhline(ref, color="k", lw=0.8, ls="--", label="ground truth")
    ax.set_xlabel("guidance weight")
    ax.grid(alpha=0.3)
