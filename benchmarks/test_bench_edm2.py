"""EDM2 forward pass in eval mode with and without the inference weight cache (CPU, float32).
Run with ``make bench``; the ratio is measured in one process and reported (the cache matters
most at small batches and in half precision, where re-normalising weights is a larger share)."""

import pytest
import torch

from autoguide_fast.networks import PRESETS, Precond
from autoguide_fast.networks.mp import MPConv
from conftest import paired_process_seconds, paired_times


@pytest.mark.parametrize("preset, batch", [("digits-s", 1), ("digits-s", 64), ("img32-xs", 8)])
def test_forward_weight_cache(benchmark, preset, batch):
    torch.manual_seed(0)
    cfg = PRESETS[preset]
    net = Precond(**cfg).eval().requires_grad_(False)
    x = torch.randn(batch, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"])
    sigma, labels = (
        torch.rand(batch) + 0.1,
        torch.eye(cfg["label_dim"])[torch.arange(batch) % cfg["label_dim"]],
    )
    convs = [m for m in net.modules() if isinstance(m, MPConv)]

    def run(cached: bool):
        for m in convs:
            m.use_cache = cached
        with torch.no_grad():
            return net(x, sigma, labels)

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=0)
    t_cached, t_plain = paired_times(lambda: run(True), lambda: run(False), rounds=9)
    speedup = t_plain / t_cached
    benchmark.extra_info.update(cached_s=t_cached, uncached_s=t_plain, speedup=speedup)
    print(
        f"\n{preset} batch {batch}: cached {t_cached * 1e3:.2f} ms, uncached {t_plain * 1e3:.2f} ms, "
        f"speedup {speedup:.2f}x"
    )
    benchmark.pedantic(lambda: run(True), rounds=5, iterations=1)


def _net(preset: str, seed: int) -> Precond:
    # Random weights with non-zero gains (a fresh network's zero output gain skips nothing, but
    # would make every output c_skip x and the comparison below vacuous).
    torch.manual_seed(seed)
    net = Precond(**PRESETS[preset]).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.8)
    return net


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize(
    "main, guide, batch",
    [("digits-s", "digits-xs", 1), ("digits-s", "digits-xs", 64)]
    + [("img32-xs", "img32-xs", 1), ("img32-xs", "img32-xs", 64)],
)
def test_sampling_fast_path(benchmark, monkeypatch, main, guide, batch, compiled):
    """sample() with autoguidance (Heun, 4 steps: 7 calls of each network) through the fast
    inference path (networks.fast) against the plain eager network, whose path is level with the
    official network's. Compiling is timed once, apart (it is paid once per network and batch size)."""
    import time

    from autoguide_fast import Autoguidance, sample
    from autoguide_fast.networks.fast import optimize

    monkeypatch.setenv("AUTOGUIDE_EDM2", "plain")  # sample() leaves the plain networks as they are
    nets = _net(main, 0), _net(guide, 1)
    cfg = PRESETS[main]
    noise = torch.randn(batch, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"])
    labels = torch.eye(10)[torch.arange(batch) % 10]
    fast = [optimize(n, compile=compiled) for n in nets]

    def run(m, g):
        return sample(m, noise, labels, guidance=Autoguidance(g, 2.0), steps=4)

    t0 = time.perf_counter()
    got = run(*fast)
    first_s = time.perf_counter() - t0
    want = run(*nets)
    err = float((got - want).abs().max())
    assert float((got - want).norm() / want.norm()) < 1e-5
    t_fast, t_plain = paired_times(lambda: run(*fast), lambda: run(*nets), rounds=5)
    speedup = t_plain / t_fast
    benchmark.extra_info.update(
        fast_s=t_fast, plain_s=t_plain, speedup=speedup, first_call_s=first_s, max_abs_err=err
    )
    kind = "compiled" if compiled else "eager"
    print(
        f"\nsample {main}+{guide} batch {batch} {kind}: fast {t_fast * 1e3:.1f} ms, "
        f"plain {t_plain * 1e3:.1f} ms, speedup {speedup:.2f}x "
        f"(first call {first_s:.1f} s, max |diff| {err:.2g})"
    )
    benchmark.pedantic(lambda: run(*fast), rounds=1, iterations=1)


SAMPLING = """
import os, time, torch
from autoguide_fast import Autoguidance, sample
from autoguide_fast.networks import PRESETS, Precond
nets = []
for seed in (0, 1):
    torch.manual_seed(seed)
    net = Precond(**PRESETS["img32-xs"]).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(0.8)
    nets.append(net)
noise = torch.randn(64, 3, 32, 32)
labels = torch.eye(10)[torch.arange(64) % 10]
run = lambda: sample(nets[0], noise, labels, guidance=Autoguidance(nets[1], 2.0), steps=4)
run()
t0 = time.perf_counter()
run()
print(time.perf_counter() - t0)
"""


def test_sampling_before_after(benchmark):
    """What a CPU user sees, process against process: img32-xs with an img32-xs guide, batch 64,
    4 Heun steps, through the eager fast path in a process whose allocator keeps freed memory
    (the defaults now) vs the plain network with glibc's allocator defaults (before)."""
    now = {"AUTOGUIDE_EDM2": "fast", "AUTOGUIDE_MALLOC": "reuse"}
    before = {"AUTOGUIDE_EDM2": "plain", "AUTOGUIDE_MALLOC": "system"}
    t_now, t_before = paired_process_seconds(SAMPLING, now, before)
    speedup = t_before / t_now
    benchmark.extra_info.update(now_s=t_now, before_s=t_before, speedup=speedup)
    print(f"\nsample img32-xs+img32-xs batch 64: now {t_now:.2f} s, before {t_before:.2f} s, {speedup:.2f}x")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert speedup > 1.0


@pytest.mark.parametrize(
    "main, guide, batch",
    [("digits-s", "digits-xs", 1), ("digits-s", "digits-xs", 64)]
    + [("img32-xs", "img32-xs", 1), ("img32-xs", "img32-xs", 64)],
)
def test_sampling_bfloat16(benchmark, monkeypatch, main, guide, batch):
    """The opt-in bfloat16 fast path (AUTOGUIDE_EDM2=bf16) against the float32 fast path:
    sample() with autoguidance, Heun, 8 steps; speed and the samples' relative L2 difference
    (bfloat16's rounding: ~1%; no goal, it is reported)."""
    from autoguide_fast import Autoguidance, sample
    from autoguide_fast.networks.fast import optimize

    monkeypatch.setenv("AUTOGUIDE_EDM2", "plain")  # sample() leaves the prepared networks as they are
    nets = _net(main, 0), _net(guide, 1)
    cfg = PRESETS[main]
    noise = torch.randn(batch, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"])
    labels = torch.eye(10)[torch.arange(batch) % 10]
    f32 = [optimize(n) for n in nets]
    bf16 = [optimize(n, dtype=torch.bfloat16) for n in nets]

    def run(m, g):
        return sample(m, noise, labels, guidance=Autoguidance(g, 2.0), steps=8)

    want, got = run(*f32), run(*bf16)
    err = float((got - want).norm() / want.norm())
    t_bf16, t_f32 = paired_times(lambda: run(*bf16), lambda: run(*f32), rounds=3)
    speedup = t_f32 / t_bf16
    benchmark.extra_info.update(bf16_s=t_bf16, f32_s=t_f32, speedup=speedup, rel_l2=err)
    print(
        f"\nsample {main}+{guide} batch {batch}: bf16 {t_bf16 * 1e3:.1f} ms, float32 {t_f32 * 1e3:.1f} ms, "
        f"speedup {speedup:.2f}x, samples' relative L2 difference {err:.2e}"
    )
    benchmark.pedantic(lambda: run(*bf16), rounds=1, iterations=1)
