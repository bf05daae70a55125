"""EDM sampler (Karras et al. 2022, Algorithm 2) over any denoiser, with guidance.

A denoiser is any callable ``D(x, sigma, labels=None) -> Tensor`` in the EDM convention
(``x = data + sigma * noise``, returns the denoised estimate). The schedule and the step plan
(churned noise level, Heun correction or not, guided or not) come from the Rust core.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import _core, checks, kernels
from ._core import AutoguideError
from .allocator import keep_freed_memory
from .guidance import Denoiser, Guidance
from .networks import fast

__all__ = [
    "PerSampleRNG",
    "StepInfo",
    "check_inputs",
    "edm_sigmas",
    "heun",
    "sample",
    "seeded_noise",
    "sigma_range",
    "step_plan",
]

edm_sigmas = _core.edm_sigmas
step_plan = _core.step_plan


@dataclass(frozen=True)
class StepInfo:
    """What the sampler reports to ``callback`` after each step.

    Attributes:
        index: step index, 0-based.
        sigma: noise level the first denoiser evaluation of the step saw (``t_hat``).
        sigma_next: noise level at the end of the step.
        x: state at ``sigma`` [N, ...].
        denoised: guided denoiser output at ``(x, sigma)`` [N, ...].
        x_next: state at ``sigma_next`` [N, ...].
    """

    index: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    denoised: torch.Tensor
    x_next: torch.Tensor


class PerSampleRNG:
    """One ``torch.Generator`` per sample, so that a sample depends only on its seed.

    Args:
        seeds: one integer seed per sample.
        device: device of the generators (and of the numbers they draw).
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        seeds = checks.seeds("seeds", seeds, distinct=False)  # a repeated seed repeats its sample
        self.device = checks.device("device", device)
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Unit normal numbers of shape ``[len(self), *shape]``; row i comes from seed i."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randint(self, high: int) -> torch.Tensor:
        """One integer in ``[0, high)`` per sample: int64 [len(self)]."""
        return torch.cat(
            [torch.randint(high, (1,), generator=g, device=self.device) for g in self.generators]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"x has batch size {x.shape[0]} but the PerSampleRNG holds {len(self)} seeds")
        return self.randn(x.shape[1:], dtype=x.dtype)


def seeded_noise(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, PerSampleRNG]:
    """Initial noise ``[len(seeds), *shape]`` and the generator to pass to :func:`sample` as
    ``generator`` (for churn noise), both drawn per seed."""
    rng = PerSampleRNG(seeds, device)
    return rng.randn(shape), rng


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, PerSampleRNG):
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _check_tensors(noise, labels, guidance, generator) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise)}")
    if noise.ndim < 1 or noise.shape[0] == 0:
        raise ValueError(f"noise must have shape [N, ...] with N >= 1, got {tuple(noise.shape)}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    real = noise.device.type != "meta"  # a meta tensor (generate's shape-only check) has no values
    if real and not bool(torch.isfinite(noise).all()):
        raise ValueError("noise must be finite, got NaN or infinite values")
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be None or a torch.Tensor, got {type(labels)}")
        if labels.ndim != 2 or labels.shape[0] != noise.shape[0]:
            raise ValueError(
                f"labels must have shape [N, label_dim] with N = {noise.shape[0]}, got {tuple(labels.shape)}"
            )
        if real and labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
            raise ValueError("labels must be finite, got NaN or infinite values")
    if guidance is not None and not isinstance(guidance, Guidance):
        raise TypeError(f"guidance must be None, Autoguidance(...) or CFG(...), got {type(guidance)}")
    if generator is not None and not isinstance(generator, (torch.Generator, PerSampleRNG)):
        raise TypeError(f"generator must be None, a torch.Generator or a PerSampleRNG, got {type(generator)}")


# EDM's schedule ends (Karras et al. 2022, Table 1), used where a model declares no range.
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


def _declared(value) -> float | None:
    # A declared range end is a real number (bool is not); anything else is not a declaration.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def sigma_range(net, sigma_min: float | None = None, sigma_max: float | None = None) -> tuple[float, float]:
    """The schedule's ends for ``net``: explicit values as given; for None, EDM's 0.002 / 80
    limited to the range the model declares with the float attributes ``sigma_min`` /
    ``sigma_max``, i.e. ``max(0.002, net.sigma_min)`` and ``min(80, net.sigma_max)`` (the rule of
    EDM's ``generate.py``). A :class:`~autoguide_fast.adapters.diffusers.DiffusersDenoiser`
    declares its training grid's ends (about 0.0292 / 14.6 for Stable Diffusion's scaled_linear
    schedule); the package's EDM2 and toy networks declare nothing, so they keep 0.002 / 80."""
    declared_min, declared_max = (
        _declared(getattr(net, "sigma_min", None)),
        _declared(getattr(net, "sigma_max", None)),
    )
    if sigma_min is None:
        sigma_min = EDM_SIGMA_MIN if declared_min is None else max(EDM_SIGMA_MIN, declared_min)
    if sigma_max is None:
        sigma_max = EDM_SIGMA_MAX if declared_max is None else min(EDM_SIGMA_MAX, declared_max)
    return float(sigma_min), float(sigma_max)


def _check_models(net, noise, labels, guidance) -> None:
    """What the package's networks declare (label_dim, img_channels, img_resolution) must fit the
    inputs and each other; other denoisers are taken as they are. A model whose resolution is
    only a default (``img_resolution_fixed = False``, as a diffusers UNet's ``sample_size``) has
    its channels checked, not its height and width."""
    label_dim = getattr(net, "label_dim", None)
    if label_dim and labels is None:
        raise ValueError(f"labels are required: the main model is conditional (label_dim {label_dim})")
    if label_dim is not None and labels is not None and labels.shape[1] != label_dim:
        raise ValueError(f"labels have {labels.shape[1]} columns, the main model's label_dim is {label_dim}")
    shape = tuple(noise.shape[1:])
    roles = [("main model", net)] + ([] if guidance is None else guidance.models)
    for role, m in roles[1:]:
        g_dim = getattr(m, "label_dim", None)
        if role == "guide" and None not in (g_dim, label_dim) and g_dim != label_dim:
            raise ValueError(f"the guide has label_dim {g_dim}, the main model {label_dim}")
        if role == "CFG model" and g_dim:
            raise ValueError(f"the CFG model must be unconditional (label_dim 0), got label_dim {g_dim}")
    for role, m in roles:
        declared = getattr(m, "sample_shape", None)  # a model of other samples (a toy model) is no guide
        if declared is not None and tuple(declared) != shape:
            raise ValueError(f"noise has shape {shape} per sample, but the {role} makes {tuple(declared)}")
        c, r = getattr(m, "img_channels", None), getattr(m, "img_resolution", None)
        if not getattr(m, "img_resolution_fixed", True) and c is not None and len(shape) == 3:
            if shape[0] != c:
                raise ValueError(f"noise has {shape[0]} channels per sample, but the {role} makes {c}")
        elif c is not None and r is not None and len(shape) == 3 and shape != (c, r, r):
            raise ValueError(f"noise has shape {shape} per sample, but the {role} makes {(c, r, r)}")


def _same_shape(d, x: torch.Tensor) -> torch.Tensor:
    # A denoiser returns the denoised x: broadcasting another shape into the state would be silent.
    if not isinstance(d, torch.Tensor) or d.shape != x.shape:
        got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ValueError(f"the main model's output must have the shape of x {tuple(x.shape)}, got {got}")
    return d


def _check_finite(x_next: torch.Tensor, step: int, outputs) -> None:
    """One reduction per step (NaN and inf propagate into the state): a non-finite value is
    reported at the step where it appears, naming the model that returned it, never written."""
    if bool(torch.isfinite(x_next).all()):
        return
    for role, sigma, d in outputs:
        if d is not None and not bool(torch.isfinite(d).all()):
            raise AutoguideError(
                f"the {role} returned non-finite values (NaN or inf) at step {step} (sigma {sigma:.4g}); "
                "its weights or inputs hold NaN/inf, or it overflowed"
            )
    raise AutoguideError(f"the sampler state became non-finite (NaN or inf) at step {step}")


def check_inputs(
    net: Denoiser,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    guidance: Guidance | None = None,
    steps: int = 32,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    churn: float = 0.0,
    churn_range: tuple[float, float] = (0.0, math.inf),
    churn_noise: float = 1.0,
    generator: torch.Generator | PerSampleRNG | None = None,
) -> list:
    """Every check :func:`sample` makes, at once, before any work; returns the step plan (Rust
    core) that :func:`heun` follows. Arguments as for :func:`sample`; ``noise`` (and ``labels``)
    may be ``meta`` tensors when only their shapes are known yet (what ``generate`` checks before
    its first batch). ValueError / TypeError naming the parameter otherwise."""
    if not callable(net):
        raise TypeError(f"net must be a denoiser callable D(x, sigma, labels=None), got {type(net).__name__}")
    _check_tensors(noise, labels, guidance, generator)
    checks.steps("steps", steps)
    _check_models(net, noise, labels, guidance)
    checks.number("churn_noise", churn_noise)
    try:
        churn_min, churn_max = (float(v) for v in churn_range)
    except (TypeError, ValueError):
        raise TypeError(f"churn_range must be a pair (S_min, S_max), got {churn_range!r}") from None
    lo, hi = guidance.interval if guidance is not None else (0.0, math.inf)
    sigma_min, sigma_max = sigma_range(net, sigma_min, sigma_max)
    return _core.step_plan(
        int(steps), float(sigma_min), float(sigma_max), float(rho), float(churn), churn_min, churn_max, lo, hi
    )


@torch.no_grad()
def sample(
    net: Denoiser,
    noise: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    guidance: Guidance | None = None,
    steps: int = 32,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    churn: float = 0.0,
    churn_range: tuple[float, float] = (0.0, math.inf),
    churn_noise: float = 1.0,
    generator: torch.Generator | PerSampleRNG | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draws samples with the EDM Heun sampler (2nd order on every step but the last).

    Args:
        net: main denoiser ``D(x, sigma, labels=None)``; ``sigma`` is passed as an [N] tensor.
        noise: unit normal [N, ...]; the first state is ``noise * sigma_max``.
        labels: None or [N, label_dim] (one-hot or soft), passed to ``net`` (and to an
            autoguidance guide).
        guidance: None, :class:`Autoguidance` or :class:`CFG`.
        steps, sigma_min, sigma_max, rho: the EDM schedule. ``sigma_min`` / ``sigma_max`` None:
            EDM's 0.002 / 80, limited to the main model's declared range (see :func:`sigma_range`).
        churn, churn_range, churn_noise: EDM's ``S_churn``, ``(S_min, S_max)`` and ``S_noise``.
        generator: source of churn noise: None (global RNG), a ``torch.Generator`` or a
            :class:`PerSampleRNG` (a sample then depends only on its seed).
        callback: called with a :class:`StepInfo` after every step.
        progress: show a tqdm progress bar over the steps.

    Returns:
        Samples [N, ...] in ``noise.dtype``.
    """
    plan = check_inputs(
        net,
        noise,
        labels,
        guidance=guidance,
        steps=steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        churn=churn,
        churn_range=churn_range,
        churn_noise=churn_noise,
        generator=generator,
    )
    keep_freed_memory()  # CPU tensors of every step reuse the last step's memory (allocator)
    # EDM2 networks on CPU float32 run their inference path (networks.fast, AUTOGUIDE_EDM2).
    net, guidance = fast.accelerate(net, guidance, noise)
    return heun(net, noise, labels, plan, guidance, churn_noise, generator, callback, progress)


@torch.no_grad()
def heun(
    net: Denoiser,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    plan: list,
    guidance: Guidance | None = None,
    churn_noise: float = 1.0,
    generator: torch.Generator | PerSampleRNG | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The EDM Heun sampler (EDM Alg. 2) over a step ``plan`` from :func:`check_inputs`, which has
    checked the arguments: :func:`sample` is ``check_inputs`` then ``heun``; callers that sample
    many batches of one shape (``generate``) check once and call ``heun`` per batch."""
    n, dtype, device = noise.shape[0], noise.dtype, noise.device
    weight = guidance.weight if guidance is not None else 1.0

    def evaluate(x: torch.Tensor, t: float, guided: bool):
        # Raw main and guide outputs; the guided combination happens inside the fused step.
        sigma = torch.full((n,), t, dtype=dtype, device=device)
        if guidance is None:
            return _same_shape(net(x, sigma, labels), x).to(dtype), None
        d_main, d_guide = guidance.evaluate(net, x, sigma, labels, guided)
        return _same_shape(d_main, x).to(dtype), None if d_guide is None else d_guide.to(dtype)

    iterator = plan
    if progress:
        iterator = tqdm(plan, desc="sampling", unit="step", leave=False)

    x_next = noise * plan[0].t_cur
    for step in iterator:
        x_cur = x_next
        t_cur, t_hat, t_next = step.t_cur, step.t_hat, step.t_next
        # Churn: raise the noise level to t_hat by adding fresh noise (EDM Alg. 2, lines 5-6).
        if step.gamma > 0:
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * churn_noise * _randn_like(x_cur, generator)
        else:
            x_hat = x_cur
        # Euler step from t_hat to t_next, then the Heun correction averaging both slopes.
        d_main, d_guide = evaluate(x_hat, t_hat, step.guided)
        m2 = g2 = None
        x_next, d_cur = kernels.guided_euler(x_hat, d_main, d_guide, weight, t_hat, t_next)
        if step.second_order:
            m2, g2 = evaluate(x_next, t_next, step.guided_next)
            x_next = kernels.guided_heun(x_hat, x_next, d_cur, m2, g2, weight, t_hat, t_next)
        guide_role = None if guidance is None else guidance.guide_role
        _check_finite(
            x_next,
            step.index,
            [
                ("main model", t_hat, d_main),
                (guide_role, t_hat, d_guide),
                ("main model", t_next, m2),
                (guide_role, t_next, g2),
            ],
        )
        if callback is not None:
            denoised = kernels.reference.guided_denoised(d_main, d_guide, weight)
            callback(StepInfo(step.index, t_hat, t_next, x_hat, denoised, x_next))
    return x_next
