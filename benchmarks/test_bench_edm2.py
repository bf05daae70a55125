"""EDM2 forward pass in eval mode with and without the inference weight cache (CPU, float32).
Run with ``make bench``; the ratio is measured in one process and reported (the cache matters
most at small batches and in half precision, where re-normalising weights is a larger share)."""

import pytest
import torch

from autoguide_fast.networks import PRESETS, Precond
from autoguide_fast.networks.mp import MPConv
from conftest import paired_times


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
