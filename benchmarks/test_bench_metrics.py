"""FID / FD_DINOv2 on the CPU: Inception feature extraction against torch-fidelity's extractor with
the same (random) weights on the same images (goal: ratio >= 1.0), and the Frechet distance at
d = 2048 against the official ``scipy.linalg.sqrtm`` form (goal: <= 1 s). Run with ``make bench``."""

import time

import numpy as np
import pytest
import torch

import autoguide_fast as ag
from autoguide_fast.metrics.inception import InceptionV3
from conftest import paired_times


def _random_weights(path) -> None:
    # He-scaled convolutions and batch-norm statistics near 1: activations stay in range.
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in InceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5
        elif k.endswith(("running_var", "bn.weight")):
            state[k] = 1 + 0.1 * torch.rand(v.shape, generator=g)
        elif v.is_floating_point():
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
    torch.save(state, path)


@pytest.mark.parametrize("size", [64, 256])
def test_inception_throughput(benchmark, tmp_path, size):
    tf = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    weights = tmp_path / "inception.pth"
    _random_weights(weights)
    ref = tf.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    )
    ours = ag.metrics.inception(weights)
    x = torch.randint(
        0, 256, (16, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    got, want = ours(x), ref(x)[0]
    assert float((got - want).norm() / want.norm()) <= 1e-5
    t_ours, t_ref = paired_times(lambda: ours(x), lambda: ref(x), rounds=5)
    ratio = t_ref / t_ours
    benchmark.extra_info.update(ours_img_s=16 / t_ours, torch_fidelity_img_s=16 / t_ref, ratio=ratio)
    print(
        f"\nInception {size}px batch 16: ours {16 / t_ours:.1f} img/s, "
        f"torch-fidelity {16 / t_ref:.1f} img/s, "
        f"ratio {ratio:.2f}x"
    )
    benchmark.pedantic(lambda: ours(x), rounds=3, iterations=1)


def test_frechet_distance_2048(benchmark):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    d = 2048
    a = rng.standard_normal((4096, d)) @ (rng.standard_normal((d, d)) * 0.05)
    b = 1.1 * a[:3000] + 0.3 + 0.2 * rng.standard_normal((3000, d))
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)

    def official():
        s = scipy_linalg.sqrtm(s1 @ s2)
        s = s[0] if isinstance(s, tuple) else s
        return float(np.real(np.square(m1 - m2).sum() + np.trace(s1 + s2 - 2 * s)))

    t0 = time.perf_counter()
    want = official()
    t_official = time.perf_counter() - t0
    t_ours, _ = paired_times(lambda: ag.metrics.frechet_distance(m1, s1, m2, s2), lambda: None, rounds=3)
    got = ag.metrics.frechet_distance(m1, s1, m2, s2)
    assert abs(got - want) <= 1e-9 * abs(want)
    benchmark.extra_info.update(ours_s=t_ours, sqrtm_s=t_official, ratio=t_official / t_ours)
    print(
        f"\nFrechet distance d=2048: ours {t_ours:.2f} s, scipy sqrtm form {t_official:.2f} s "
        f"({t_official / t_ours:.1f}x)"
    )
    benchmark.pedantic(lambda: ag.metrics.frechet_distance(m1, s1, m2, s2), rounds=2, iterations=1)
