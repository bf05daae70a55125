"""The EDM sampler and the guidance wrappers, against closed forms and an independent sampler."""

import math

import pytest
import torch

from autoguide_fast import CFG, Autoguidance, PerSampleRNG, StepInfo, sample, seeded_noise, step_plan


class GaussianData:
    """Exact denoiser of data ~ N(mean, sd^2 I): D(x, s) = mean + (x - mean) sd^2 / (sd^2 + s^2)."""

    def __init__(self, mean, sd=0.5):
        self.mean, self.sd = mean, sd
        self.calls = []

    def __call__(self, x, sigma, labels=None):
        self.calls.append((float(sigma[0]), labels))
        s2 = sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2
        return self.mean + (x - self.mean) * self.sd**2 / (self.sd**2 + s2)


def reference_heun(
    net,
    noise,
    steps,
    sigma_min,
    sigma_max,
    rho,
    churn=0.0,
    s_min=0.0,
    s_max=math.inf,
    s_noise=1.0,
    generator=None,
):
    """EDM Algorithm 2 written out directly (float64 schedule), independent of the library."""
    i = torch.arange(steps, dtype=torch.float64)
    t = (
        sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)]).tolist()
    x_next = noise * t[0]
    for n in range(steps):
        x_cur, t_cur, t_next = x_next, t[n], t[n + 1]
        gamma = min(churn / steps, math.sqrt(2) - 1) if churn > 0 and s_min <= t_cur <= s_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            eps = torch.randn(x_cur.shape, generator=generator, dtype=x_cur.dtype)
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * s_noise * eps
        sig = torch.full((x_cur.shape[0],), t_hat, dtype=x_cur.dtype)
        d_cur = (x_hat - net(x_hat, sig)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if n < steps - 1:
            sig = torch.full((x_cur.shape[0],), t_next, dtype=x_cur.dtype)
            d_prime = (x_next - net(x_next, sig)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def test_ode_solution_of_gaussian_data_matches_closed_form():
    # For Gaussian data the probability-flow ODE keeps (x - mean) / sqrt(sd^2 + sigma^2) constant.
    mean, sd, smax = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64), 0.5, 80.0
    noise = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = mean + (noise * smax - mean) * sd / math.sqrt(sd**2 + smax**2)
    err = {}
    for steps in (64, 128):
        x = sample(GaussianData(mean, sd), noise, steps=steps, sigma_max=smax, sigma_min=1e-4)
        err[steps] = ((x - want).norm() / want.norm()).item()
    assert err[128] < 5e-4
    # Heun is second order: halving the step size divides the error by about 4.
    assert 3.6 < err[64] / err[128] < 4.4


@pytest.mark.parametrize("steps", [1, 2, 7, 32])
@pytest.mark.parametrize("churn", [0.0, 30.0])
def test_sampler_equals_independent_heun(steps, churn):
    net = GaussianData(torch.tensor([1.0, -0.5]))
    noise = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = sample(
        net,
        noise,
        steps=steps,
        churn=churn,
        churn_range=(0.05, 50.0),
        churn_noise=1.003,
        generator=torch.Generator().manual_seed(7),
    )
    ref = reference_heun(
        net,
        noise,
        steps,
        0.002,
        80.0,
        7.0,
        churn,
        0.05,
        50.0,
        1.003,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_autoguidance_is_lerp_of_denoisers_and_guide_gets_labels():
    main, guide = GaussianData(torch.tensor([1.0, 0.0])), GaussianData(torch.tensor([0.0, 1.0]), sd=0.3)
    labels = torch.eye(4, 3, dtype=torch.float64)
    noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = 2.5
    x = sample(main, noise, labels, guidance=Autoguidance(guide, w), steps=6)
    ref = reference_heun(lambda x, s: guide(x, s).lerp(main(x, s), w), noise, 6, 0.002, 80.0, 7.0)
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
    assert guide.calls[0][1] is labels


def test_cfg_calls_the_guide_without_labels():
    main, uncond = GaussianData(torch.tensor([1.0])), GaussianData(torch.tensor([0.0]))
    labels = torch.ones(2, 5)
    sample(main, torch.zeros(2, 1), labels, guidance=CFG(uncond, 3.0), steps=4)
    assert all(lab is labels for _, lab in main.calls)
    assert uncond.calls and all(lab is None for _, lab in uncond.calls)


@pytest.mark.parametrize("interval", [None, (0.0, 1.0), (0.3, 5.0), (1e3, 1e4)])
def test_guide_is_evaluated_only_inside_the_interval(interval):
    main, guide = GaussianData(torch.tensor([1.0])), GaussianData(torch.tensor([0.0]))
    sample(main, torch.zeros(3, 1), guidance=Autoguidance(guide, 2.0, interval=interval), steps=12)
    lo, hi = interval or (0.0, math.inf)
    assert len(main.calls) == 2 * 12 - 1
    want = [s for s, _ in main.calls if lo <= s <= hi]
    assert [s for s, _ in guide.calls] == want
    plan = step_plan(12, 0.002, 80.0, 7.0, interval_lo=lo, interval_hi=hi)
    assert len(want) == sum(p.guided for p in plan) + sum(p.guided_next for p in plan)


def test_guidance_interval_changes_only_the_guided_steps():
    main, guide = GaussianData(torch.tensor([1.0])), GaussianData(torch.tensor([-1.0]))
    noise = torch.randn(3, 1, dtype=torch.float64)
    full = sample(main, noise, guidance=Autoguidance(guide, 2.0), steps=8)
    empty = sample(main, noise, guidance=Autoguidance(guide, 2.0, interval=(1e3, 1e4)), steps=8)
    none = sample(main, noise, steps=8)
    torch.testing.assert_close(empty, none, rtol=0, atol=0)
    assert not torch.allclose(full, none)


def test_weight_one_never_calls_the_guide():
    main, guide = GaussianData(torch.tensor([1.0])), GaussianData(torch.tensor([0.0]))
    x = sample(main, torch.ones(2, 1), guidance=CFG(guide, 1.0), steps=5)
    assert guide.calls == []
    torch.testing.assert_close(x, sample(main, torch.ones(2, 1), steps=5))


def test_per_sample_seeding_is_independent_of_the_batch():
    net = GaussianData(torch.tensor([0.2, 0.4, 0.6]))
    kw = dict(steps=10, churn=40.0)
    noise, rng = seeded_noise(range(8), (3,))
    batch = sample(net, noise, generator=rng, **kw)
    noise2, rng2 = seeded_noise([5, 2], (3,))
    pair = sample(net, noise2, generator=rng2, **kw)
    torch.testing.assert_close(pair, batch[[5, 2]], rtol=0, atol=0)
    noise3, rng3 = seeded_noise([5, 2], (3,))
    other = sample(net, noise3, generator=rng3, steps=10, churn=40.0, churn_noise=1.5)
    assert not torch.allclose(other, pair)  # churn noise was actually drawn and used


def test_callback_reports_every_step():
    net = GaussianData(torch.tensor([0.0]))
    seen: list[StepInfo] = []
    x = sample(net, torch.ones(2, 1), steps=6, callback=seen.append, progress=True)
    plan = step_plan(6, 0.002, 80.0, 7.0)
    assert [s.index for s in seen] == list(range(6))
    assert [s.sigma for s in seen] == [p.t_hat for p in plan]
    assert [s.sigma_next for s in seen] == [p.t_next for p in plan]
    torch.testing.assert_close(seen[-1].x_next, x)
    torch.testing.assert_close(seen[0].denoised, net(seen[0].x, torch.full((2,), 80.0)))


def test_bad_input_is_rejected_with_the_parameter_name():
    net = GaussianData(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="noise must be finite"):
        sample(net, torch.tensor([[float("nan")]]))
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        sample(net, [[0.0]])
    with pytest.raises(ValueError, match="labels must have shape"):
        sample(net, torch.zeros(3, 1), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="labels must have shape"):
        sample(net, torch.zeros(3, 1), torch.zeros(3))
    with pytest.raises(TypeError, match="guidance must be"):
        sample(net, torch.zeros(3, 1), guidance=2.0)
    with pytest.raises(ValueError, match="^steps must be"):
        sample(net, torch.zeros(3, 1), steps=0)
    with pytest.raises(ValueError, match="weight must be a finite number"):
        Autoguidance(net, float("inf"))
    with pytest.raises(TypeError, match="weight must be a real number"):
        CFG(net, "2")
    with pytest.raises(TypeError, match="guide must be a denoiser"):
        Autoguidance(None, 2.0)
    with pytest.raises(ValueError, match=r"interval\[1\]"):
        Autoguidance(net, 2.0, interval=(2.0, 1.0))

    def wrong_shape(x, sigma, labels=None):
        return torch.zeros(x.shape[0], 7)

    with pytest.raises(ValueError, match="guide output must have the main model's shape"):
        sample(net, torch.zeros(3, 1), guidance=Autoguidance(wrong_shape, 2.0), steps=2)
    with pytest.raises(ValueError, match="seeds must be"):
        PerSampleRNG([-1])
    noise, rng = seeded_noise([0, 1], (1,))
    with pytest.raises(ValueError, match="batch size 3"):
        sample(net, torch.zeros(3, 1), churn=10.0, generator=rng)
