"""The paper's toy training recipe: exact-score matching against the ground-truth mixture, Adam,
power-function EMA; models of one shape trained together as one batched computation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..allocator import keep_freed_memory
from ..ema import PowerFunctionEMA
from ..networks.toy import ToyModel, ToyStack, torch_single_threaded
from .toy_mixture import ground_truth

__all__ = ["EMA_STD", "train", "train_snapshots", "train_together"]


EMA_STD = 0.010  # the recipe's power-function EMA width


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
    ema_std: float = EMA_STD,
) -> ToyModel:
    """Trains a :class:`ToyModel` on ``ground_truth(classes)`` with the paper's recipe and
    returns its power-function EMA (std ``ema_std``) in eval mode.

    Exact-score matching: ``sigma ~ exp(N(P_mean, P_std^2))``, loss
    ``sigma^2 |score_gt - score_model|^2``, Adam (0.9, 0.99), lr ``lr_ref / sqrt(max(t / lr_iter, 1))``.
    """
    models = train_snapshots(
        classes,
        num_layers,
        hidden_dim,
        (iters,),
        batch_size,
        seed,
        progress,
        ema_stds=(ema_std,),
        lr_ref=lr_ref,
        lr_iter=lr_iter,
        P_mean=P_mean,
        P_std=P_std,
    )
    return models[(iters, float(ema_std))]


def train_snapshots(
    classes: str = "A",
    num_layers: int = 4,
    hidden_dim: int = 64,
    iters: Sequence[int] = (4096,),
    batch_size: int = 4096,
    seed: int = 0,
    progress: bool = False,
    *,
    ema_stds: Sequence[float] = (EMA_STD,),
    lr_ref: float = 1e-2,
    lr_iter: int = 512,
    P_mean: float = -2.3,
    P_std: float = 1.5,
) -> dict[tuple[int, float], ToyModel]:
    """One training run of :func:`train`, with the EMA of every width in ``ema_stds`` copied at
    every iteration count in ``iters``: ``{(iters, ema_std): model}``.

    The learning-rate schedule does not depend on the training length, so the EMA copied at
    iteration ``t`` equals what ``train(..., iters=t, ema_std=...)`` returns, bit for bit: one run
    gives every training length of a guide search.
    """
    try:
        lengths = sorted({int(t) for t in iters})
    except (TypeError, ValueError):
        raise ValueError(f"iters must be positive integers, got {iters!r}") from None
    for name, v in [("batch_size", batch_size)] + [("iters", t) for t in iters]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    ground_truth(classes)  # ValueError naming bad classes before anything is trained
    (out,) = train_together(
        [(classes, seed)],
        num_layers,
        hidden_dim,
        lengths,
        batch_size,
        ema_stds,
        progress,
        lr_ref=lr_ref,
        lr_iter=lr_iter,
        P_mean=P_mean,
        P_std=P_std,
    )
    return out


# Iterations whose training data is drawn and scored in one call of the Rust core.
DATA_CHUNK = 64

# A run of train_together compiles its step (ToyStack.compile_) when models x points x hidden^2
# x layers x iterations is at least this. Measured on 2 cores: compiling costs ~25 s per model
# shape with a cold inductor cache (~4 s warm) and saves ~1/3 of an eager step (45 -> 30 ms for
# 3 x 4096 x 64^2 x 4, i.e. 7.5e-11 s per unit), so it pays from ~3.3e11 cold; the recipe's main
# models (8.2e11) compile, its guides (2.6e10: 23 -> 13 ms per step would save 11 s) and --quick
# do not.
COMPILE_WORTH = 5e11


def train_together(
    runs: Sequence[tuple[str, int]],
    num_layers: int,
    hidden_dim: int,
    lengths: Sequence[int],
    batch_size: int,
    ema_stds: Sequence[float] = (EMA_STD,),
    progress: bool = False,
    *,
    lr_ref: float = 1e-2,
    lr_iter: int = 512,
    P_mean: float = -2.3,
    P_std: float = 1.5,
    compile: bool | None = None,
) -> list[dict[tuple[int, float], ToyModel]]:
    """:func:`train_snapshots` of several ``(classes, seed)`` runs of one model shape at once: the
    models are stacked and trained as one batched computation (:class:`ToyStack`); every run
    draws its data from its own seeded generator exactly as it would alone. ``compile``: run the
    step through ``torch.compile`` (None: when the run's work pays for it, ``COMPILE_WORTH``)."""
    keep_freed_memory()  # the step's tensors reuse the last step's memory: 2x faster (allocator)
    stds = list(dict.fromkeys(float(s) for s in ema_stds))
    gts = [ground_truth(classes) for classes, _ in runs]
    gens = [torch.Generator().manual_seed(seed) for _, seed in runs]
    nets = []
    for _, seed in runs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            nets.append(ToyModel(num_layers=num_layers, hidden_dim=hidden_dim))
    stack = ToyStack(nets)
    if compile is None:  # the core's kernel needs no compiling
        work = len(runs) * batch_size * hidden_dim**2 * num_layers * max(lengths)
        compile = not stack.uses_core and work >= COMPILE_WORTH
    if compile:
        stack.compile_()
    ema = PowerFunctionEMA(stack, stds)
    # Fused: one kernel per step for all parameters (0.96 -> 0.51 ms per step of the three main
    # models on 2 cores, measured), the same formula element by element.
    opt = torch.optim.Adam(stack.parameters(), lr=lr_ref, betas=(0.9, 0.99), fused=True)
    names = ",".join(dict.fromkeys(c for c, _ in runs))
    bar = tqdm(
        total=lengths[-1],
        desc=f"train {names} {num_layers}x{hidden_dim} ({len(runs)} models)",
        unit="it",
        leave=False,
        disable=not progress,
    )
    out: list[dict[tuple[int, float], ToyModel]] = [{} for _ in runs]
    with torch_single_threaded(stack.uses_core):
        _train_loop(stack, ema, opt, gts, gens, lengths, batch_size, out, bar, lr_ref, lr_iter, P_mean, P_std)
    bar.close()
    return out


def _train_loop(stack, ema, opt, gts, gens, lengths, batch_size, out, bar, lr_ref, lr_iter, P_mean, P_std):
    # Data in chunks of DATA_CHUNK iterations, one chunk ahead: while a chunk trains, the next one's
    # targets are scored on the core's idle threads (they fill the cores the loop leaves idle).
    total = lengths[-1]
    sizes = [min(DATA_CHUNK, total - start) for start in range(0, total, DATA_CHUNK)]
    upcoming = _start_data(gts, gens, sizes[0], batch_size, P_mean, P_std)
    for c, chunk in enumerate(sizes):
        start = c * DATA_CHUNK
        sigma, x, targets = upcoming
        if c + 1 < len(sizes):  # drawn while this chunk's targets finish
            upcoming = _start_data(gts, gens, sizes[c + 1], batch_size, P_mean, P_std)
        target = torch.stack([t() for t in targets], dim=1)
        for i in range(chunk):
            it = start + i
            opt.param_groups[0]["lr"] = lr_ref / math.sqrt(max(it / lr_iter, 1))
            stack.normalize_()
            stack.loss_backward(x[i], sigma[i], target[i])
            opt.step()
            ema.update(it + 1, 1)
            if it + 1 in lengths:
                for std, averaged in zip(ema.stds, ema.emas):
                    for k, net in enumerate(averaged.models()):
                        out[k][(it + 1, std)] = net
            bar.update()


def _start_data(gts, gens, iters: int, batch_size: int, P_mean: float, P_std: float):
    """``iters`` iterations of training data of every run: noise levels [iters, S, N], points
    [iters, S, N, 2], and per run a function that waits for their ground-truth scores [iters,
    N, 2] (float32 core, scored on its idle threads)."""
    sigma = torch.empty(iters, len(gts), batch_size)
    x = torch.empty(iters, len(gts), batch_size, 2)
    targets = []
    for k, (gt, gen) in enumerate(zip(gts, gens)):
        for i in range(iters):  # the draws of one iteration, in the order of the recipe
            sigma[i, k] = (torch.randn(batch_size, generator=gen) * P_std + P_mean).exp()
            x[i, k] = gt.sample(batch_size, sigma[i, k], generator=gen)
        targets.append(gt.score_f32_start(x[:, k], sigma[:, k]))
    return sigma, x, targets
