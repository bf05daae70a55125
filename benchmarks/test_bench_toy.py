"""Toy benchmarks: sampler overhead, and toy training speed against a straightforward eager
implementation of the same recipe and against the previous implementation (autograd, float64
targets, one model at a time). Run with ``make bench``; ratios are measured in one process."""

import copy
import math

import numpy as np
import pytest
import torch

from autoguide_fast import Autoguidance, sample, step_plan
from autoguide_fast.ema import PowerFunctionEMA
from autoguide_fast.networks.toy import ToyModel, ToyStack
from autoguide_fast.studies import toy
from conftest import paired_process_seconds, paired_ratio, paired_times


def test_sampler_overhead(benchmark):
    """``sample()`` over the toy model vs the bare denoiser calls it makes (goal: ratio <= 1.05)."""
    torch.manual_seed(0)
    main, guide = ToyModel(hidden_dim=64).eval(), ToyModel(hidden_dim=32).eval()
    noise = torch.randn(8192, 2)
    guidance = Autoguidance(guide, 2.0)
    plan = step_plan(32, 0.002, 5.0, 7.0)
    evals = [(s.t_hat, s.guided) for s in plan] + [(s.t_next, s.guided_next) for s in plan if s.second_order]

    def bare():
        x = noise * 5.0
        for t, _ in evals:
            sigma = torch.full((len(x),), t)
            guide(x, sigma)
            main(x, sigma)

    def sampler():
        sample(main, noise, guidance=guidance, steps=32, sigma_max=5.0)

    t_sampler, t_bare, ratio = paired_ratio(sampler, bare, rounds=15)
    benchmark.extra_info.update(sampler_s=t_sampler, bare_calls_s=t_bare, overhead_ratio=ratio)
    print(f"\nsampler {t_sampler * 1e3:.1f} ms, bare denoiser calls {t_bare * 1e3:.1f} ms, ratio {ratio:.3f}")
    benchmark.pedantic(sampler, rounds=3, iterations=1)
    assert ratio <= 1.05


class EagerRecipe:
    """The paper's toy training step written plainly: eigendecomposition-based mixture score with
    einsum over every (point, component) pair, and the model score by double backpropagation."""

    def __init__(self, classes: str, hidden_dim: int, batch_size: int, seed: int = 0):
        gt = toy.ground_truth(classes)
        self.phi, self.mu, self.Sigma = gt.phi.float(), gt.mu.float(), gt.Sigma.float()
        self.L, self.Q = torch.linalg.eigh(self.Sigma)
        self.batch_size = batch_size
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.net = ToyModel(hidden_dim=hidden_dim).train()
        self.opt = torch.optim.Adam(self.net.parameters(), betas=(0.9, 0.99))
        self.it = 0

    def gt_score(self, x, sigma):
        L = self.L + sigma[..., None, None] ** 2
        y = self.mu - x[..., None, :]
        z = torch.einsum("...ij,...j,...kj,...k->...i", self.Q, 1 / L, self.Q, y)
        c = self.phi / ((2 * np.pi) ** 2 * L.prod(-1)).sqrt()
        w = (c * (-0.5 * torch.einsum("...i,...i->...", y, z)).exp())[..., None]
        return (w * z).sum(-2) / w.sum(-2)

    def sample(self, sigma):
        i = torch.multinomial(self.phi, len(sigma), replacement=True, generator=self.gen)
        L = self.L[i] + sigma[:, None] ** 2
        z = torch.randn(L.shape, generator=self.gen)
        return torch.einsum("...ij,...j,...kj,...k->...i", self.Q[i], L.sqrt(), self.Q[i], z) + self.mu[i]

    def step(self):
        self.opt.param_groups[0]["lr"] = 1e-2 / math.sqrt(max(self.it / 512, 1))
        sigma = (torch.randn(self.batch_size, generator=self.gen) * 1.5 - 2.3).exp()
        x = self.sample(sigma)
        target = self.gt_score(x, sigma)
        xg = x.detach().requires_grad_(True)
        score = torch.autograd.grad(self.net.logp(xg, sigma).sum(), xg, create_graph=True)[0]
        loss = (sigma**2 * (target - score).square().mean(-1)).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.it += 1


def test_toy_training_speed(benchmark):
    """Training iterations/s of ``toy.train`` (main model recipe, batch 4096) vs the eager
    implementation above (goal: >= 3x)."""
    iters = 6
    eager = EagerRecipe("A", 64, 4096)

    def ours():
        toy.train("A", hidden_dim=64, iters=iters, batch_size=4096)

    def plain():
        for _ in range(iters):
            eager.step()

    t_ours, t_eager = paired_times(ours, plain, rounds=3)
    speedup = t_eager / t_ours
    benchmark.extra_info.update(ours_it_s=iters / t_ours, eager_it_s=iters / t_eager, speedup=speedup)
    print(
        f"\ntoy training: ours {iters / t_ours:.1f} it/s, eager {iters / t_eager:.1f} it/s, "
        f"speedup {speedup:.2f}x"
    )
    benchmark.pedantic(ours, rounds=1, iterations=1)
    assert speedup >= 3.0


def previous_train(classes: str, hidden_dim: int, iters: int, batch_size: int, seed: int) -> ToyModel:
    """``toy.train`` as it was before models were stacked: per iteration a float64 ground-truth
    score, and the model's score and its parameter gradients by double back-propagation."""
    gt = toy.ground_truth(classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ToyModel(hidden_dim=hidden_dim).train()
    ema = PowerFunctionEMA(net, [0.010])
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99))
    for it in range(iters):
        opt.param_groups[0]["lr"] = 1e-2 / math.sqrt(max(it / 512, 1))
        sigma = (torch.randn(batch_size, generator=gen) * 1.5 - 2.3).exp()
        x = gt.sample(batch_size, sigma, generator=gen)
        target = gt.score(x, sigma)
        loss = (sigma**2 * (target - net.score(x, sigma)).square().mean(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(it + 1, 1)
    return copy.deepcopy(ema.emas[0])


def test_toy_main_models_speed(benchmark):
    """The three main models of ``autoguide toy`` (4x64, batch 4096, seeds 0, 10, 20), trained as
    one stack vs one after another the previous way, over the same iterations (not slower;
    1.2-1.5x measured on a loaded 2-core machine)."""
    iters, seeds = 8, (0, 10, 20)

    def ours():
        toy.train_together([("A", s) for s in seeds], 4, 64, [iters], 4096)

    def previous():
        for s in seeds:
            previous_train("A", 64, iters, 4096, s)

    t_ours, t_prev = paired_times(ours, previous, rounds=3)
    speedup = t_prev / t_ours
    benchmark.extra_info.update(ours_s=t_ours, previous_s=t_prev, speedup=speedup)
    print(f"\n3 main models x {iters} it: stacked {t_ours:.2f} s, previous {t_prev:.2f} s, {speedup:.2f}x")
    benchmark.pedantic(ours, rounds=1, iterations=1)
    assert speedup >= 1.0


def test_mixture_score_float32_speed(benchmark):
    """Training targets: the core's float32 score vs its float64 score, per 4096 class-A points at
    the recipe's noise levels, scored as training does (16 iterations of points in one call, so
    that the float32 score's tiles leave out negligible components; goal >= 1.5x)."""
    gt = toy.ground_truth("A")
    gen = torch.Generator().manual_seed(0)
    sigma = (torch.randn(16 * 4096, generator=gen) * 1.5 - 2.3).exp()
    x = gt.sample(16 * 4096, sigma, generator=gen)
    t32, t64 = paired_times(lambda: gt.score_f32(x, sigma), lambda: gt.score(x, sigma), rounds=5)
    t32, t64 = t32 / 16, t64 / 16
    benchmark.extra_info.update(float32_ms=t32 * 1e3, float64_ms=t64 * 1e3, speedup=t64 / t32)
    print(f"\nmixture score per 4096 points: float32 {t32 * 1e3:.2f} ms, float64 {t64 * 1e3:.2f} ms")
    benchmark.pedantic(lambda: gt.score_f32(x, sigma), rounds=3, iterations=1)
    assert t64 / t32 >= 1.5


def test_toy_step_speed(benchmark):
    """One training step of a main model (loss, gradients, Adam): ToyStack's explicit formulas
    (three models stacked, time per model) vs autograd's double back-propagation (not slower)."""
    gt = toy.ground_truth("A")
    gen = torch.Generator().manual_seed(0)
    sigma = (torch.randn(4096, generator=gen) * 1.5 - 2.3).exp()
    x = gt.sample(4096, sigma, generator=gen)
    target = gt.score_f32(x, sigma)
    torch.manual_seed(0)
    net = ToyModel(hidden_dim=64).train()
    net.gain.data.fill_(0.5)  # a trained model's gain: gradients reach every weight
    stack = ToyStack([copy.deepcopy(net) for _ in range(3)])
    opt, stack_opt = (torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.9, 0.99)) for m in (net, stack))
    X, S, T = (t.expand(3, *t.shape).contiguous() for t in (x, sigma, target))

    def autograd_step():
        loss = (sigma**2 * (target - net.score(x, sigma)).square().mean(-1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def stacked_step():
        stack.normalize_()
        stack.loss_backward(X, S, T)
        stack_opt.step()

    t_stack, t_auto = paired_times(stacked_step, autograd_step, rounds=9)
    speedup = t_auto / (t_stack / 3)
    benchmark.extra_info.update(
        stacked_ms_per_model=t_stack / 3 * 1e3, autograd_ms=t_auto * 1e3, speedup=speedup
    )
    print(f"\nper model: stacked {t_stack / 3 * 1e3:.1f} ms, autograd {t_auto * 1e3:.1f} ms, {speedup:.2f}x")
    benchmark.pedantic(stacked_step, rounds=3, iterations=1)
    assert speedup >= 1.0


STEP = """
import time, torch
from autoguide_fast.allocator import keep_freed_memory
from autoguide_fast.networks.toy import ToyModel, ToyStack
from autoguide_fast.studies import toy
keep_freed_memory()
nets = []
for seed in (0, 10, 20):
    torch.manual_seed(seed)
    nets.append(ToyModel(hidden_dim=64))
    nets[-1].gain.data.fill_(0.5)
stack = ToyStack(nets)
if {compile}:
    stack.compile_()
gt, gen = toy.ground_truth("A"), torch.Generator().manual_seed(0)
sigma = (torch.randn(3, 4096, generator=gen) * 1.5 - 2.3).exp()
x = gt.sample(3 * 4096, sigma.reshape(-1), generator=gen).reshape(3, 4096, 2)
target = gt.score_f32(x, sigma)
for _ in range(5):
    stack.loss_backward(x, sigma, target)
t0 = time.perf_counter()
for _ in range(50):
    stack.loss_backward(x, sigma, target)
print((time.perf_counter() - t0) / 50)
"""


def test_toy_step_core_kernel(benchmark):
    """The loss and gradients of the three stacked main models on 4,096 points each: the Rust
    core's kernel (the default where it runs) vs torch's explicit formulas, eager and compiled
    (the previous default for the main models), each in its own process so that no thread pool
    spins against another's (goal: faster than both)."""
    if not ToyStack([ToyModel(hidden_dim=64)]).uses_core:
        pytest.skip("the core's toy kernel needs AVX-512")
    core = {"AUTOGUIDE_TOY": "core"}
    t_core, t_eager = paired_process_seconds(STEP.format(compile=False), core, {"AUTOGUIDE_TOY": "torch"})
    t_core2, t_compiled = paired_process_seconds(STEP.format(compile=True), core, {"AUTOGUIDE_TOY": "torch"})
    t_core = min(t_core, t_core2)
    benchmark.extra_info.update(core_ms=t_core * 1e3, eager_ms=t_eager * 1e3, compiled_ms=t_compiled * 1e3)
    print(
        f"\nthree main models, 4,096 points: core {t_core * 1e3:.1f} ms, torch eager {t_eager * 1e3:.1f} ms"
        f" ({t_eager / t_core:.2f}x), compiled {t_compiled * 1e3:.1f} ms ({t_compiled / t_core:.2f}x)"
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert t_core < t_eager and t_core < t_compiled


MAIN_STACK = """
import time
from autoguide_fast.studies.toy_training import train_together
train_together([("A", 0), ("A", 10), ("A", 20)], 4, 64, [4], 4096)  # warm-up
t0 = time.perf_counter()
train_together([("A", 0), ("A", 10), ("A", 20)], 4, 64, [{iters}], 4096)
print(time.perf_counter() - t0)
"""


def test_toy_main_models_allocator(benchmark):
    """The three main models of ``autoguide toy`` trained together for 128 iterations in a process
    whose allocator keeps freed memory (AUTOGUIDE_MALLOC=reuse, the default) vs glibc's defaults
    (system): before and after, process against process (goal: faster; 1.6x measured)."""
    code = MAIN_STACK.format(iters=128)
    reuse, system = {"AUTOGUIDE_MALLOC": "reuse"}, {"AUTOGUIDE_MALLOC": "system"}
    t_reuse, t_system = paired_process_seconds(code, reuse, system)
    speedup = t_system / t_reuse
    benchmark.extra_info.update(reuse_s=t_reuse, system_s=t_system, speedup=speedup)
    print(
        f"\n3 main models x 128 it: reuse {t_reuse:.2f} s ({128 / t_reuse:.1f} it/s), "
        f"system {t_system:.2f} s ({128 / t_system:.1f} it/s), {speedup:.2f}x"
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert speedup > 1.0


def test_toy_targets_in_background(benchmark, monkeypatch):
    """The three main models over three data chunks (192 iterations): each chunk's targets scored
    on the core's idle threads while the previous chunk trains (the default) vs scored in the
    foreground before the chunk trains (the previous way), same data bit for bit (goal: faster;
    1.08-1.17x measured on 2 cores over 512 iterations)."""
    from autoguide_fast.studies import toy_mixture, toy_training

    runs, iters = [("A", 0), ("A", 10), ("A", 20)], 3 * toy_training.DATA_CHUNK
    background = toy_mixture.GaussianMixture.score_f32_start

    def foreground_start(self, x, sigma):
        score = self.score_f32(x, sigma)
        return lambda: score

    def train(start):
        monkeypatch.setattr(toy_mixture.GaussianMixture, "score_f32_start", start)
        return toy_training.train_together(runs, 4, 64, [iters], 4096)

    ours, previous = train(background), train(foreground_start)
    for a, b in zip(ours, previous):
        assert all(torch.equal(a[key].gain, b[key].gain) for key in a)
    t_ours, t_prev, ratio = paired_ratio(lambda: train(background), lambda: train(foreground_start), rounds=3)
    benchmark.extra_info.update(background_s=t_ours, foreground_s=t_prev, speedup=1 / ratio)
    print(
        f"\n3 main models x {iters} it: targets in background {t_ours:.2f} s, "
        f"foreground {t_prev:.2f} s ({1 / ratio:.2f}x)"
    )
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert t_ours < t_prev
