"""The 2D toy experiment of "Guiding a Diffusion Model with a Bad Version of Itself"
(Karras et al. 2024, Section 3 and Figure 1).

- :func:`ground_truth`: the tree-shaped class-conditional Gaussian mixtures ("A", "B", "AB"),
  with exact log-density, score and sampling at any noise level (Rust core, float64).
- :func:`train`: the paper's toy training recipe (exact-score matching, Adam, power-function EMA).
- :func:`evaluate`: precision, k-NN precision/recall, mean log-density and branch coverage.
- :func:`run`: the whole experiment (three models, eight sampling methods, table and figure);
  ``autoguide toy`` on the command line.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import _core
from .checkpoint import (
    atomic_path,
    atomic_write_bytes,
    load_network,
    read_metadata,
    save_network,
    strict_json,
)
from .ema import PowerFunctionEMA
from .guidance import CFG, Autoguidance
from .metrics import knn_precision_recall
from .networks.toy import ToyModel
from .sampling import sample

__all__ = ["CLASSES", "GaussianMixture", "ToyRecipe", "evaluate", "ground_truth", "run", "train"]

CLASSES = ("A", "B", "AB")
COMPONENTS_PER_BRANCH = 8


class GaussianMixture:
    """2D Gaussian mixture ``sum_k phi_k N(mu_k, Sigma_k)``, diffused by ``N(0, sigma^2 I)``.

    Exact evaluation runs in the Rust core in float64; results come back in ``x``'s dtype and device.
    Calling the mixture makes it a denoiser: ``D(x, sigma) = x + sigma^2 * score(x, sigma)``.

    Args:
        phi: component weights [K] (normalised here).
        mu: means [K, 2].
        Sigma: covariances [K, 2, 2], symmetric positive definite.
    """

    def __init__(self, phi, mu, Sigma):
        phi = torch.as_tensor(np.asarray(phi), dtype=torch.float64)
        self.phi = phi / phi.sum()
        self.mu = torch.as_tensor(np.asarray(mu), dtype=torch.float64)
        self.Sigma = torch.as_tensor(np.asarray(Sigma), dtype=torch.float64)
        if self.mu.shape != (len(phi), 2) or self.Sigma.shape != (len(phi), 2, 2):
            raise ValueError(
                f"mu and Sigma must be [K, 2] and [K, 2, 2] for K = {len(phi)} weights, "
                f"got {tuple(self.mu.shape)} and {tuple(self.Sigma.shape)}"
            )
        self._mixture = _core.Mixture2D(
            phi.tolist(), self.mu.flatten().tolist(), self.Sigma.flatten().tolist()
        )

    def __len__(self) -> int:
        return len(self.phi)

    def _eval(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-1:] != (2,):
            raise ValueError(f"x must have shape [..., 2], got {tuple(x.shape)}")
        shape = x.shape[:-1]
        xs = x.detach().to("cpu", torch.float64).reshape(-1, 2).contiguous()
        s = torch.as_tensor(sigma, dtype=torch.float64).to("cpu").broadcast_to(shape).reshape(-1).contiguous()
        logp, score, argmax = self._mixture.eval(xs.numpy().tobytes(), s.numpy().tobytes())
        return (
            torch.from_numpy(np.frombuffer(logp, dtype=np.float64).copy()).reshape(shape),
            torch.from_numpy(np.frombuffer(score, dtype=np.float64).copy()).reshape(*shape, 2),
            torch.from_numpy(np.frombuffer(argmax, dtype=np.uint32).astype(np.int64)).reshape(shape),
        )

    def logp(self, x: torch.Tensor, sigma=0) -> torch.Tensor:
        """``log p(x; sigma)`` for ``x`` [..., 2], ``sigma`` scalar or [...]: [...]."""
        return self._eval(x, sigma)[0].to(x.dtype).to(x.device)

    def score(self, x: torch.Tensor, sigma=0) -> torch.Tensor:
        """``grad_x log p(x; sigma)``: [..., 2]."""
        return self._eval(x, sigma)[1].to(x.dtype).to(x.device)

    def responsible(self, x: torch.Tensor, sigma=0) -> torch.Tensor:
        """Index of the component with the largest posterior responsibility: int64 [...]."""
        return self._eval(x, sigma)[2].to(x.device)

    def __call__(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Exact denoiser ``E[y | x] = x + sigma^2 * score`` (labels must be None)."""
        if labels is not None:
            raise ValueError("labels must be None: a GaussianMixture is already one set of classes")
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1]).unsqueeze(-1)
        return x + s**2 * self.score(x, sigma)

    def sample(self, n: int, sigma=0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples of ``p(x; sigma)`` (``sigma`` scalar or [n]): float32 [n, 2] on the CPU."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        s2 = torch.as_tensor(sigma, dtype=torch.float64).to("cpu").broadcast_to((n,)) ** 2
        i = torch.multinomial(self.phi, n, replacement=True, generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        # Closed-form Cholesky factor of Sigma_i + sigma^2 I.
        a, b, c = self.Sigma[i, 0, 0] + s2, self.Sigma[i, 0, 1], self.Sigma[i, 1, 1] + s2
        l11 = a.sqrt()
        l21 = b / l11
        l22 = (c - l21**2).sqrt()
        x = self.mu[i] + torch.stack([l11 * z[:, 0], l21 * z[:, 0] + l22 * z[:, 1]], dim=-1)
        return x.float()

    def branch_masses(self) -> torch.Tensor:
        """Total weight of every branch (``COMPONENTS_PER_BRANCH`` consecutive components): [B]."""
        return self.phi.reshape(-1, COMPONENTS_PER_BRANCH).sum(-1)


@functools.cache
def ground_truth(classes: str = "A") -> GaussianMixture:
    """The paper's ground-truth distribution for ``classes`` in {"A", "B", "AB"}: each class a
    binary tree of depth 7 (127 branches) drawn as 8 elongated Gaussians per branch."""
    if classes not in CLASSES:
        raise ValueError(f"classes must be one of {CLASSES}, got {classes!r}")
    rnd = np.random.RandomState(2)
    origin, scale = np.array([0.0030, 0.0325]), np.array([1.3136, 1.3844])
    comps: list[tuple[str, float, np.ndarray, np.ndarray]] = []

    def branch(cls: str, depth: int, pos: np.ndarray, angle: float) -> None:
        if depth >= 7:
            return
        direction = np.array([np.cos(angle), np.sin(angle)])
        length = 0.292 * (0.8**depth) * (rnd.randn() * 0.2 + 1)
        thick = 0.2 * (0.8**depth) / length
        size = scale * length * 0.06
        along = np.outer(direction, direction)
        cov = (along + (np.eye(2) - along) * (thick**2)) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, num=COMPONENTS_PER_BRANCH):
            comps.append((cls, length * (0.5**depth), (pos + direction * length * t) * scale, cov))
        for sign in (1, -1):
            turn = sign * (0.7**depth) * (rnd.randn() * 0.2 + 1)
            branch(cls, depth + 1, pos + direction * length, angle + turn)

    branch("A", 0, origin, np.pi * 0.25)
    branch("B", 0, origin, np.pi * 1.25)
    sel = [c for c in comps if c[0] in classes]
    return GaussianMixture([c[1] for c in sel], np.stack([c[2] for c in sel]), np.stack([c[3] for c in sel]))


def train(
    classes: str = "A",
    num_layers: int = 4,
    hidden_dim: int = 64,
    iters: int = 4096,
    batch_size: int = 4096,
    seed: int = 0,
    progress: bool = False,
    *,
    lr_ref: float = 1e-2,
    lr_iter: int = 512,
    P_mean: float = -2.3,
    P_std: float = 1.5,
    ema_std: float = 0.010,
) -> ToyModel:
    """Trains a :class:`ToyModel` on ``ground_truth(classes)`` with the paper's recipe and
    returns its power-function EMA (std ``ema_std``) in eval mode.

    Exact-score matching: ``sigma ~ exp(N(P_mean, P_std^2))``, loss
    ``sigma^2 |score_gt - score_model|^2``, Adam (0.9, 0.99), lr ``lr_ref / sqrt(max(t / lr_iter, 1))``.
    """
    for name, v in (("iters", iters), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    gt = ground_truth(classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyModel(num_layers=num_layers, hidden_dim=hidden_dim).train()
    ema = PowerFunctionEMA(net, [ema_std])
    opt = torch.optim.Adam(net.parameters(), lr=lr_ref, betas=(0.9, 0.99))
    steps = range(iters)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"train {classes} {num_layers}x{hidden_dim}", unit="it", leave=False)
    for it in steps:
        opt.param_groups[0]["lr"] = lr_ref / math.sqrt(max(it / lr_iter, 1))
        sigma = (torch.randn(batch_size, generator=gen) * P_std + P_mean).exp()
        x = gt.sample(batch_size, sigma, generator=gen)
        target = gt.score(x, sigma)
        loss = (sigma**2 * (target - net.score(x, sigma)).square().mean(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(it + 1, 1)
    return ema.emas[0]


@functools.lru_cache(maxsize=8)
def _reference(classes: str, num_knn: int, num_threshold: int, seed: int) -> tuple[torch.Tensor, float]:
    gt = ground_truth(classes)
    gen = torch.Generator().manual_seed(seed)
    knn_ref = gt.sample(num_knn, 0, gen)
    threshold = torch.quantile(gt.logp(gt.sample(num_threshold, 0, gen).double()), 0.01)
    return knn_ref, float(threshold)


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
    knn_p, knn_r = knn_precision_recall(ref, samples.float(), k=k)
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
    weights: tuple[float, ...] = (2.0, 3.0, 4.0)


QUICK = ToyRecipe(main_iters=200, guide_iters=50, batch_size=512, num_samples=1024, steps=16)
METRICS = ("precision", "knn_precision", "knn_recall", "mean_logp", "branch_tvd")


def _method_name(kind: str, w: float) -> str:
    return f"{kind}_w{w:g}"


def _models(out: Path, recipe: ToyRecipe, retrain: bool, progress: bool, log: Callable[[str], None]):
    spec = {
        "main": ("A", recipe.main_hidden, recipe.main_iters),
        "guide": ("A", recipe.guide_hidden, recipe.guide_iters),
        "uncond": ("AB", recipe.guide_hidden, recipe.guide_iters),
    }
    models, seconds = {}, {}
    for seed, (name, (classes, hidden, iters)) in enumerate(spec.items()):
        path = out / f"{name}.safetensors"
        want = dict(classes=classes, layers=recipe.num_layers, hidden=hidden, iters=iters,
                    batch_size=recipe.batch_size, seed=seed)  # fmt: skip
        if path.is_file() and not retrain and read_metadata(path).get("recipe") == json.dumps(want):
            models[name] = load_network(path)
            seconds[name] = float(read_metadata(path).get("train_seconds", "nan"))
            log(f"reusing {path}")
            continue
        t0 = time.perf_counter()
        net = train(
            classes, recipe.num_layers, hidden, iters, recipe.batch_size, seed=seed, progress=progress
        )
        seconds[name] = time.perf_counter() - t0
        log(f"trained {name} ({classes}, {recipe.num_layers}x{hidden}, {iters} it) in {seconds[name]:.1f} s")
        save_network(net, path, recipe=want, train_seconds=seconds[name])
        models[name] = net
    return models, seconds


def run(
    out: str | Path = "runs/toy",
    *,
    quick: bool = False,
    retrain: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, float]]:
    """The toy experiment: trains (or reuses) the main model, the autoguidance guide and the
    unconditional CFG guide in ``out``, samples every method from the class-A ground truth at
    ``sigma_max``, writes ``metrics.json`` and ``figure.png`` and returns the metrics."""
    recipe = QUICK if quick else ToyRecipe()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory, got the file {out}")
    out.mkdir(parents=True, exist_ok=True)
    models, seconds = _models(out, recipe, retrain, progress, log)

    gt = ground_truth("A")
    gen = torch.Generator().manual_seed(1)
    x_init = gt.sample(recipe.num_samples, recipe.sigma_max, generator=gen)
    noise = x_init / recipe.sigma_max
    methods: dict[str, torch.Tensor] = {"ground_truth": gt.sample(recipe.num_samples, 0, generator=gen)}
    runs = [("none", None)]
    for kind, cls, guide in (("autoguidance", Autoguidance, "guide"), ("cfg", CFG, "uncond")):
        runs += [(_method_name(kind, w), cls(models[guide], w)) for w in recipe.weights]
    for name, guidance in runs:
        methods[name] = sample(
            models["main"], noise, guidance=guidance, steps=recipe.steps, sigma_max=recipe.sigma_max,
            progress=progress,
        )  # fmt: skip
    metrics = {name: evaluate(x) for name, x in methods.items()}
    result = dict(recipe=asdict(recipe), train_seconds=seconds, metrics=metrics)
    atomic_write_bytes(out / "metrics.json", (strict_json(result, indent=2) + "\n").encode())
    plot(methods, out / "figure.png", weight=recipe.weights[0])
    log(format_table(metrics))
    log(
        f"training time: {sum(seconds.values()):.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())})"
    )
    log(f"wrote {out / 'metrics.json'} and {out / 'figure.png'}")
    return metrics


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """Markdown table of :func:`evaluate` results, one row per method."""
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in METRICS) + " |")
    return "\n".join(lines)


def plot(methods: dict[str, torch.Tensor], path: str | Path, weight: float = 2.0) -> None:
    """Figure in the spirit of the paper's Figure 1: samples of the ground truth, no guidance,
    CFG and autoguidance (rows: each guidance weight) over the class-A outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = sorted({float(n.rsplit("_w", 1)[1]) for n in methods if n.startswith("cfg_w")}) or [weight]
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
    fig, axes = plt.subplots(len(panels), 2, figsize=(8, 4 * len(panels)), squeeze=False)
    for row, pair in zip(axes, panels):
        for ax, (key, title) in zip(row, pair):
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
    fig.suptitle("2D toy (class A): samples over the ground-truth outline (1% log-density quantile)")
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    with atomic_path(path) as tmp:  # the temporary ends in .tmp: name the format
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=110)
    plt.close(fig)
