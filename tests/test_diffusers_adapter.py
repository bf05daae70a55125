"""diffusers UNets through the adapter: sigma <-> timestep, diffusers' own Heun loop, guidance,
conditioning batches. Small random models built from configs; nothing is downloaded."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, HeunDiscreteScheduler, UNet2DConditionModel, UNet2DModel  # noqa: E402

from autoguide_fast import CFG, Autoguidance, edm_sigmas, sample  # noqa: E402
from autoguide_fast.adapters.diffusers import denoiser  # noqa: E402

STEPS = 6
# diffusers builds its sigma grid with np.array(tensor), which numpy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def small_unet(seed: int = 0, **config) -> UNet2DModel:
    """A small random UNet2DModel on 8x8x3 images; ``config`` overrides or adds constructor arguments."""
    torch.manual_seed(seed)
    base = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return UNet2DModel(**{**base, **config}).eval()


def small_cond_unet(seed: int, width: int = 32) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


class Counted:
    """A denoiser that counts its calls."""

    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, sigma, labels=None):
        self.calls += 1
        return self.net(x, sigma, labels)


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_sigma_t_round_trip():
    d = denoiser(small_unet(), DDPMScheduler(num_train_timesteps=1000))
    grid = d.sigmas
    assert d.sigma_min == pytest.approx(float(grid[0])) and d.sigma_max == pytest.approx(float(grid[-1]))
    t = torch.arange(1000, dtype=torch.float64)
    torch.testing.assert_close(d.sigma_to_t(grid), t, rtol=0, atol=1e-9)  # on grid points
    torch.testing.assert_close(d.t_to_sigma(t), grid, rtol=1e-12, atol=0)
    between = torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 999
    torch.testing.assert_close(d.sigma_to_t(d.t_to_sigma(between)), between, rtol=0, atol=1e-9)
    # Between two grid points, t is linear in log-sigma: the geometric mean sits half-way.
    mid = (grid[10] * grid[11]).sqrt()
    assert float(d.sigma_to_t(mid)) == pytest.approx(10.5, abs=1e-9)
    # diffusers' own conversion (the same rule on a float32 log grid) agrees to float32 precision.
    train = DDPMScheduler(num_train_timesteps=1000)
    log_grid32 = (((1 - train.alphas_cumprod) / train.alphas_cumprod) ** 0.5).log().numpy()
    ref = HeunDiscreteScheduler._sigma_to_t(None, d.t_to_sigma(between).numpy(), log_grid32)
    torch.testing.assert_close(torch.from_numpy(ref), between, rtol=0, atol=1e-3)


class Oracle(torch.nn.Module):
    """A "UNet" that knows the data point x0 and answers in the given parametrization: with
    a = 1 / sqrt(sigma^2 + 1), its input is a x = a x0 + a sigma eps, so eps = (x - x0) / sigma and
    v = a eps - a sigma x0 (DDPM's v = sqrt(abar) eps - sqrt(1 - abar) x0 in the scaled space)."""

    def __init__(self, x0, sigma, prediction_type, expected_t):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.x0, self.sigma, self.kind, self.expected_t = x0, sigma, prediction_type, expected_t

    def forward(self, sample, timestep, return_dict=True):
        torch.testing.assert_close(timestep, self.expected_t.float().expand(len(sample)))
        s = self.sigma.double()[:, None, None, None]
        a = 1 / (s * s + 1).sqrt()
        eps = (sample.double() / a - self.x0) / s
        out = {"epsilon": eps, "v_prediction": a * eps - a * s * self.x0, "sample": self.x0}[self.kind]
        return (out.float(),)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_types_recover_the_data(prediction_type):
    """An exact model must make D(x0 + sigma eps, sigma) = x0 in every parametrization."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.7, 6.0, 120.0], dtype=torch.float64)
    x = x0 + sigma[:, None, None, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    train = DDPMScheduler(prediction_type=prediction_type)
    grid = denoiser(small_unet(), train)  # only for sigma_to_t
    oracle = Oracle(x0, sigma, prediction_type, grid.sigma_to_t(sigma))
    d = denoiser(oracle, train)
    got = d(x, sigma)
    assert got.dtype == torch.float64
    # The oracle answers in float32 (as a UNet would); at sigma 120 epsilon's x - sigma * eps
    # cancels ~120x its float32 rounding, hence the relative tolerance on |x|.
    torch.testing.assert_close(got, x0, rtol=0, atol=float(x.abs().max()) * 2e-7)


def diffusers_heun(unet, train_scheduler, noise, steps):
    """diffusers' own Heun loop over the Karras sigmas of the training grid."""
    # Not from_config: it drops the values the training scheduler left at its own defaults, and
    # HeunDiscreteScheduler's defaults (betas 0.00085..0.012) are not DDPMScheduler's (0.0001..0.02).
    c = train_scheduler.config
    sched = HeunDiscreteScheduler(
        num_train_timesteps=c.num_train_timesteps,
        beta_start=c.beta_start,
        beta_end=c.beta_end,
        beta_schedule=c.beta_schedule,
        prediction_type=c.prediction_type,
        use_karras_sigmas=True,
    )
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(sched.scale_model_input(x, t), t, return_dict=False)[0]
        x = sched.step(out, t, x, return_dict=False)[0]
    return x, sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_unguided_equals_diffusers_heun(prediction_type):
    unet = small_unet()
    train = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    d = denoiser(unet, train)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, sched = diffusers_heun(unet, train, noise, STEPS)
    # The same schedule: HeunDiscreteScheduler interleaves [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]
    # (each inner sigma twice, for the Euler step and the Heun correction); its Karras sigmas use
    # rho 7 and the grid's ends, stored in float32.
    ours_sigmas = torch.tensor(edm_sigmas(STEPS, d.sigma_min, d.sigma_max, 7.0), dtype=torch.float64)
    torch.testing.assert_close(
        torch.unique_consecutive(sched.sigmas).double(), ours_sigmas, rtol=1e-6, atol=0
    )
    # And the same plan: Heun on every step but the last, which is Euler to sigma 0 (diffusers ends
    # on a first-order step as well), so both evaluate the model 2 * STEPS - 1 times.
    assert len(sched.timesteps) == 2 * STEPS - 1
    counted = Counted(d)
    ours = sample(counted, noise, steps=STEPS, sigma_min=d.sigma_min, sigma_max=d.sigma_max, rho=7.0)
    assert counted.calls == 2 * STEPS - 1
    # float32 both ways; they differ only in rounding: diffusers stores sigmas and timesteps in
    # float32 (the sampler keeps float64 sigmas), orders the Heun update differently
    # (x + dt * (d1 + d2) / 2 vs the fused step) and takes v-prediction's x0 in another order.
    # Each is a few float32 ulps (~1e-7 relative) per operation; over 2 * STEPS - 1 model calls
    # through a random UNet they stay well under 1e-5.
    err = rel_err(ours, ref)
    assert err < 1e-5, err


def cond_setup(prediction_type="epsilon"):
    train = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    main_unet, guide_unet = small_cond_unet(0, 32), small_cond_unet(1, 16)
    g = torch.Generator().manual_seed(2)
    text = torch.randn(1, 5, 16, generator=g)  # one prompt, shared by the batch
    negative = torch.randn(1, 5, 16, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    return train, main_unet, guide_unet, text, negative, noise


def reference_guided(main, guide, w, noise, sigmas):
    """Heun with D = D0 + w (D1 - D0), Euler on the last step; main/guide are plain functions of
    (x, sigma) written without the library."""

    def guided(x, s):
        d1, d0 = main(x, s), guide(x, s)
        return d0 + w * (d1 - d0)

    x = noise * sigmas[0]
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        dx = (x - guided(x, s)) / s
        x_next = x + (s_next - s) * dx
        if i < len(sigmas) - 2:
            dx2 = (x_next - guided(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * (dx + dx2) / 2
        x = x_next
    return x


def plain_denoiser(unet, train, prediction_type, cond):
    """Adapter math written out independently: VP sigma grid, log-linear timestep, c_in scaling."""
    abar = train.alphas_cumprod.double()
    log_grid = ((1 - abar) / abar).sqrt().log()

    def call(x, s):
        ls = torch.log(torch.tensor(s, dtype=torch.float64))
        i = int(torch.clamp((log_grid <= ls).sum() - 1, 0, len(log_grid) - 2))
        t = i + float((ls - log_grid[i]) / (log_grid[i + 1] - log_grid[i]))
        a = 1 / (s * s + 1) ** 0.5
        out = unet(
            x * a, torch.tensor(t, dtype=torch.float32), encoder_hidden_states=cond.expand(len(x), -1, -1)
        )
        out = out.sample
        if prediction_type == "epsilon":
            return x - s * out
        return a * a * x - a * s * out

    return call


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("method", ["autoguidance", "cfg"])
def test_guided_equals_reference(method, prediction_type):
    train, main_unet, guide_unet, text, negative, noise = cond_setup(prediction_type)
    main = denoiser(main_unet, train, encoder_hidden_states=text)
    if method == "autoguidance":
        guide = Counted(denoiser(guide_unet, train, encoder_hidden_states=text))
        guidance, ref_guide = (
            Autoguidance(guide, 2.0),
            plain_denoiser(guide_unet, train, prediction_type, text),
        )
    else:
        guide = Counted(denoiser(main_unet, train, encoder_hidden_states=negative))
        guidance, ref_guide = CFG(guide, 2.0), plain_denoiser(main_unet, train, prediction_type, negative)
    sigmas = edm_sigmas(STEPS, main.sigma_min, main.sigma_max, 7.0)
    with torch.no_grad():
        ours = sample(
            main, noise, guidance=guidance, steps=STEPS, sigma_min=main.sigma_min, sigma_max=main.sigma_max
        )
        ref = reference_guided(
            plain_denoiser(main_unet, train, prediction_type, text), ref_guide, 2.0, noise, sigmas
        )
    assert guide.calls == 2 * STEPS - 1
    # Same float32 model calls; the rest is sampler arithmetic in another order (a few ulps per
    # step, amplified by w = 2), see test_unguided_equals_diffusers_heun.
    err = rel_err(ours, ref)
    assert err < 1e-5, err


def test_guide_not_called_at_weight_one():
    train, main_unet, guide_unet, text, _, noise = cond_setup()
    main = denoiser(main_unet, train, encoder_hidden_states=text)
    guide = Counted(denoiser(guide_unet, train, encoder_hidden_states=text))
    plain = sample(main, noise, steps=3, sigma_min=main.sigma_min, sigma_max=main.sigma_max)
    guided = sample(
        main,
        noise,
        guidance=Autoguidance(guide, 1.0),
        steps=3,
        sigma_min=main.sigma_min,
        sigma_max=main.sigma_max,
    )
    assert guide.calls == 0
    torch.testing.assert_close(guided, plain, rtol=0, atol=0)


def test_conditioning_batches():
    train, main_unet, _, text, _, noise = cond_setup()
    x, sigma = noise * 3.0, torch.full((3,), 3.0)
    per_sample = text.expand(3, -1, -1).clone()
    shared = denoiser(main_unet, train, encoder_hidden_states=text)
    full = denoiser(main_unet, train, encoder_hidden_states=per_sample)
    with torch.no_grad():
        torch.testing.assert_close(shared(x, sigma), full(x, sigma), rtol=0, atol=0)
        # Each row of a batch-N conditioning goes to its own sample.
        other = per_sample.clone()
        other[1] = torch.randn(5, 16)
        mixed = denoiser(main_unet, train, encoder_hidden_states=other)(x, sigma)
        base = full(x, sigma)
        torch.testing.assert_close(mixed[[0, 2]], base[[0, 2]])
        assert not torch.allclose(mixed[1], base[1])
        # A 0-d sigma is broadcast to the batch.
        torch.testing.assert_close(shared(x, torch.tensor(3.0)), base, rtol=0, atol=0)
        with pytest.raises(ValueError, match="encoder_hidden_states has batch size 2.*3 samples"):
            denoiser(main_unet, train, encoder_hidden_states=text.expand(2, -1, -1))(x, sigma)
        # Nested dicts (SDXL's added_cond_kwargs) are checked the same way.
        bad = denoiser(
            main_unet, train, encoder_hidden_states=text, added_cond_kwargs={"text_embeds": torch.ones(2, 4)}
        )
        with pytest.raises(ValueError, match=r"added_cond_kwargs\['text_embeds'\] has batch size 2"):
            bad(x, sigma)


def test_labels_and_configuration_errors():
    train, main_unet, _, text, _, noise = cond_setup()
    d = denoiser(main_unet, train, encoder_hidden_states=text)
    with pytest.raises(ValueError, match="labels must be None: the UNet has no class embedding"):
        d(noise, torch.full((3,), 1.0), torch.eye(3))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        denoiser(main_unet, DDPMScheduler(prediction_type="flow"), encoder_hidden_states=text)
    with pytest.raises(ValueError, match="must not contain 'timestep'"):
        denoiser(main_unet, train, timestep=torch.zeros(1))
    with pytest.raises(TypeError, match="unet must be a torch.nn.Module"):
        denoiser(lambda x: x, train)


def test_class_labels_one_hot():
    unet = small_unet(0, num_class_embeds=5)
    train = DDPMScheduler()
    d = denoiser(unet, train)
    assert d.label_dim == 5
    x, sigma = torch.randn(2, 3, 8, 8), torch.full((2,), 2.0)
    with torch.no_grad():
        ours = d(x, sigma, torch.eye(5)[[1, 3]])
        carried = denoiser(unet, train, class_labels=torch.tensor([1, 3]))(x, sigma)
    torch.testing.assert_close(ours, carried, rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels are required"):
        d(x, sigma)
    with pytest.raises(ValueError, match="one-hot"):
        d(x, sigma, torch.full((2, 5), 0.2))


def test_null_class_makes_the_cfg_model():
    # A DiT-style class-conditional UNet: 4 classes + a "no class" row (index 4) for label dropout.
    unet = small_unet(0, num_class_embeds=5)
    train = DDPMScheduler()
    main, uncond = denoiser(unet, train), denoiser(unet, train, null_class=4)
    assert main.label_dim == 5 and uncond.label_dim == 0
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.full((2,), 2.0), torch.eye(5)[[1, 3]]
    with torch.no_grad():
        guided = CFG(uncond, 2.5).evaluate(main, x, sigma, labels, True)
        d_main = main(x, sigma, labels)
        d_null = denoiser(unet, train, class_labels=torch.tensor([4, 4]))(x, sigma)
    torch.testing.assert_close(guided[0], d_main, rtol=0, atol=0)
    torch.testing.assert_close(guided[1], d_null, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"null_class must be in \[0, 5\)"):
        denoiser(unet, train, null_class=5)
    with pytest.raises(ValueError, match="class embedding is a table"):
        denoiser(small_unet(0), train, null_class=0)


def test_flow_matching_scheduler_is_named():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="flow-matching scheduler.*not supported yet"):
        denoiser(small_unet(0), FlowMatchEulerDiscreteScheduler())
