"""diffusers UNets through seeded generation: the default sigma range, the pipeline VAE decode,
conditioning batches, write_outputs. Small random models built from configs; nothing is downloaded."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDPMScheduler  # noqa: E402
from PIL import Image  # noqa: E402

from autoguide_fast import Autoguidance, PerSampleRNG, sample  # noqa: E402
from autoguide_fast.adapters.diffusers import denoiser  # noqa: E402
from autoguide_fast.data import to_uint8
from autoguide_fast.generation import generate, write_outputs  # noqa: E402
from autoguide_fast.interop.vae import VAE_BATCH  # noqa: E402
from autoguide_fast.networks.edm2 import Precond  # noqa: E402
from autoguide_fast.sampling import sigma_range  # noqa: E402
from test_diffusers_adapter import small_cond_unet, small_unet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = 3


def sd_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """Stable Diffusion's training schedule (scaled_linear betas 0.00085..0.012)."""
    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )


def tiny_vae(scaling_factor=0.18215, shift_factor=None, stats=False) -> AutoencoderKL:
    """One resolution level, so latents have the images' size (8 x 8 here)."""
    torch.manual_seed(5)
    extra = dict(latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(0.5, 1.5, 1.0, 2.0)) if stats else {}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=8,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        **extra,
    ).eval()


def pipeline_decode(vae, z):
    """What a diffusers pipeline does with final latents, then EDM's uint8 rounding, in one batch."""
    c = vae.config
    if c.latents_mean is not None:
        mean, std = (torch.tensor(v).reshape(1, -1, 1, 1) for v in (c.latents_mean, c.latents_std))
        z = z * std / c.scaling_factor + mean
    else:
        z = z / c.scaling_factor + (c.shift_factor or 0.0)
    with torch.no_grad():
        pixels = vae.decode(z).sample
    return (pixels.clamp(-1, 1) * 127.5 + 128).clip(0, 255).to(torch.uint8)


def decoded(vae, samples, batch):
    """pipeline_decode in generate's chunks of ``batch`` and VAE_BATCH images per VAE call (the
    same matrix shapes, so the same float32 rounding)."""
    chunks = [z for chunk in samples.split(batch) for z in chunk.split(VAE_BATCH)]
    return torch.cat([pipeline_decode(vae, z) for z in chunks])


def reference_images(net, seeds, batch, guidance=None, label_dim=None):
    """generate's per-seed recipe written out, chunk by chunk (the official split: near-equal
    chunks of at most ``batch``): noise, then class, then churn from one generator per seed;
    returns the samples [N, ...] and the labels [N, label_dim] or None."""
    samples, labels = [], []
    count = (len(seeds) - 1) // batch + 1
    for chunk in np.array_split(np.array(seeds), count):
        rng = PerSampleRNG(chunk.tolist())
        noise = rng.randn((net.img_channels, net.img_resolution, net.img_resolution))
        onehot = None
        if label_dim:
            onehot = torch.nn.functional.one_hot(rng.randint(label_dim), label_dim).float()
            labels.append(onehot)
        samples.append(sample(net, noise, onehot, guidance=guidance, generator=rng, steps=STEPS))
    return torch.cat(samples), torch.cat(labels) if labels else None


def assert_batch_invariant(a_images, a_samples, b_images, b_samples):
    """The same seeds sampled in other chunks. CPU matrix products (the UNet's linear layers) may
    round a row differently with another number of rows, so samples agree to float32 rounding
    amplified by the steps, and a pixel next to a rounding boundary may move one level."""
    torch.testing.assert_close(a_samples, b_samples, rtol=0, atol=2e-4)
    diff = (a_images.int() - b_images.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


def run(net, seeds, **kw):
    batches = list(generate(net, seeds, steps=STEPS, device="cpu", **kw))
    assert [s for b in batches for s in b.seeds] == list(seeds)
    classes = None if batches[0].classes is None else torch.cat([b.classes for b in batches])
    return torch.cat([b.images for b in batches]), torch.cat([b.samples for b in batches]), classes


def test_default_sigma_range_is_the_training_grid():
    d = denoiser(small_unet(), sd_scheduler())
    assert (d.sigma_min, d.sigma_max) == pytest.approx((0.02917, 14.6146), abs=1e-4)
    assert sigma_range(d) == (d.sigma_min, d.sigma_max)
    assert sigma_range(d, 0.5, None) == (0.5, d.sigma_max)  # explicit values are used as given
    assert sigma_range(d, 0.001, 100.0) == (0.001, 100.0)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = sample(d, noise, steps=STEPS)
    ref = sample(d, noise, steps=STEPS, sigma_min=d.sigma_min, sigma_max=d.sigma_max)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert not torch.equal(ours, sample(d, noise, steps=STEPS, sigma_min=0.002, sigma_max=80.0))
    # DDPM's linear schedule reaches sigma 157: EDM's 80 limits it; its 0.01 lifts EDM's 0.002.
    ddpm = denoiser(small_unet(), DDPMScheduler())
    assert ddpm.sigma_max > 80 and sigma_range(ddpm) == (max(0.002, ddpm.sigma_min), 80.0)


def test_edm_models_keep_the_edm_range():
    torch.manual_seed(0)
    net = Precond(
        img_resolution=8,
        img_channels=3,
        label_dim=0,
        model_channels=16,
        channel_mult=(1,),
        num_blocks=1,
        attn_resolutions=(),
    ).eval()
    assert not hasattr(net, "sigma_min") and not hasattr(net, "sigma_max")
    assert sigma_range(net) == (0.002, 80.0)
    assert sigma_range(lambda x, s, labels=None: x) == (0.002, 80.0)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        sample(net, noise, steps=STEPS),
        sample(net, noise, steps=STEPS, sigma_min=0.002, sigma_max=80.0),
        rtol=0,
        atol=0,
    )
    # EDM (2022) style declarations: EDMPrecond's 0 / inf leave EDM's range; non-numbers are ignored.
    assert sigma_range(SimpleNamespace(sigma_min=0.0, sigma_max=float("inf"))) == (0.002, 80.0)
    assert sigma_range(SimpleNamespace(sigma_min="0.5", sigma_max=None)) == (0.002, 80.0)


def test_adapter_image_attributes():
    d = denoiser(small_unet(), DDPMScheduler())
    assert (d.img_channels, d.img_resolution, d.encoder.kind) == (3, 8, "standard_rgb")
    latent = denoiser(small_cond_unet(0), DDPMScheduler(), encoder_hidden_states=torch.zeros(1, 5, 16))
    assert (latent.img_channels, latent.img_resolution, latent.encoder.kind) == (4, 8, "diffusers_vae")
    assert latent.encoder.latent and latent.conditioning_batch == 1
    assert denoiser(small_unet(), DDPMScheduler(), resolution=16).img_resolution == 16
    assert denoiser(small_unet(), DDPMScheduler(), latent=True).encoder.kind == "diffusers_vae"
    pixel4 = denoiser(
        small_cond_unet(0), DDPMScheduler(), latent=False, encoder_hidden_states=torch.zeros(1, 5, 16)
    )
    assert pixel4.encoder.kind == "standard_rgb"
    # sample_size is a default, not a limit: sample() takes other sizes; channels are checked.
    with torch.no_grad():
        assert sample(d, torch.randn(1, 3, 16, 16), steps=2).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="noise has 4 channels per sample, but the main model makes 3"):
        sample(d, torch.randn(1, 4, 8, 8), steps=2)

    class NonSquare(torch.nn.Module):
        config = SimpleNamespace(in_channels=3, sample_size=(8, 16))

    with pytest.raises(ValueError, match=r"sample_size is \(8, 16\), not square.*resolution=N"):
        denoiser(NonSquare(), DDPMScheduler())
    assert denoiser(NonSquare(), DDPMScheduler(), resolution=8).img_resolution == 8
    with pytest.raises(ValueError, match="resolution must be a positive integer.*got 0"):
        denoiser(small_unet(), DDPMScheduler(), resolution=0)
    with pytest.raises(TypeError, match="latent must be None, True or False, got 'yes'"):
        denoiser(small_unet(), DDPMScheduler(), latent="yes")
    with pytest.raises(ValueError, match="one common batch size"):
        denoiser(
            small_cond_unet(0),
            DDPMScheduler(),
            encoder_hidden_states=torch.zeros(2, 5, 16),
            added_cond_kwargs={"time_ids": torch.zeros(3, 6)},
        )


def test_generate_pixel_unet_equals_sample_and_ignores_batching():
    unet = small_unet(0, num_class_embeds=5)
    d = denoiser(unet, sd_scheduler("v_prediction"))
    seeds = [3, 1, 4, 15, 9, 2, 6]
    images3, samples3, classes3 = run(d, seeds, batch=3)
    images5, samples5, classes5 = run(d, seeds, batch=5)
    assert images3.dtype == torch.uint8 and images3.shape == (7, 3, 8, 8)
    ref, labels = reference_images(d, seeds, 3, label_dim=5)
    torch.testing.assert_close(samples3, ref, rtol=0, atol=0)
    torch.testing.assert_close(images3, to_uint8(ref), rtol=0, atol=0)
    torch.testing.assert_close(classes3, labels.argmax(1), rtol=0, atol=0)
    torch.testing.assert_close(classes3, classes5, rtol=0, atol=0)
    assert_batch_invariant(images3, samples3, images5, samples5)
    assert len(set(classes3.tolist())) > 1  # a class per seed, not one for all
    fixed, _, classes = run(d, seeds[:2], class_idx=4)
    assert classes.tolist() == [4, 4]


@pytest.mark.parametrize(
    "vae_config",
    [dict(), dict(scaling_factor=0.13025, shift_factor=0.0609), dict(scaling_factor=0.5, stats=True)],
    ids=["sd", "shift_factor", "latents_mean_std"],
)
def test_latent_unet_decodes_like_the_pipeline(vae_config, tmp_path):
    vae = tiny_vae(**vae_config)
    text = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(7))
    d = denoiser(small_cond_unet(0), sd_scheduler(), encoder_hidden_states=text)
    seeds = list(range(6))  # more than VAE_BATCH (4): the decode is batched
    images, samples, classes = run(d, seeds, batch=5, vae=vae)
    assert classes is None and images.shape == (6, 3, 8, 8)
    ref, _ = reference_images(d, seeds, 5)
    torch.testing.assert_close(samples, ref, rtol=0, atol=0)
    torch.testing.assert_close(images, decoded(vae, samples, 5), rtol=0, atol=0)
    assert images.float().std() > 5  # decoded pixels, not a constant
    # The same VAE as a folder (save_pretrained layout) gives the same images.
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    from_folder, _, _ = run(d, seeds, batch=5, vae=str(tmp_path / "pipe" / "vae"))
    torch.testing.assert_close(from_folder, images, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="is a pipeline folder; pass its VAE folder"):
        run(d, seeds, vae=tmp_path / "pipe")


def test_latent_unet_without_vae_is_refused_before_sampling():
    d = denoiser(small_cond_unet(0), sd_scheduler(), encoder_hidden_states=torch.zeros(1, 5, 16))
    with pytest.raises(ValueError, match=r"makes VAE latents.*vae=pipe\.vae.*nothing is downloaded"):
        generate(d, [0, 1], steps=STEPS, device="cpu")


def test_autoguidance_through_generate_equals_sample(tmp_path):
    vae = tiny_vae()
    text = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(8))
    train = sd_scheduler()
    main = denoiser(small_cond_unet(0, 32), train, encoder_hidden_states=text)
    guide = denoiser(small_cond_unet(1, 16), train, encoder_hidden_states=text)
    seeds = [10, 11, 12, 13]
    guidance = Autoguidance(guide, 2.0)
    images, samples, _ = run(main, seeds, guidance=guidance, batch=3, vae=vae)
    ref, _ = reference_images(main, seeds, 3, guidance=guidance)
    torch.testing.assert_close(samples, ref, rtol=0, atol=0)
    torch.testing.assert_close(images, decoded(vae, samples, 3), rtol=0, atol=0)
    images4, samples4, _ = run(main, seeds, guidance=guidance, batch=4, vae=vae)
    assert_batch_invariant(images, samples, images4, samples4)
    unguided, _, _ = run(main, seeds, batch=4, vae=vae)
    assert not torch.equal(unguided, images4)
    # write_outputs: one PNG per seed with the same pixels, or one .npz.
    manifest = write_outputs(
        generate(main, seeds, guidance=guidance, batch=4, steps=STEPS, vae=vae, device="cpu"),
        tmp_path / "png",
        {"model": "tiny"},
    )
    assert manifest["complete"] and (tmp_path / "png-grid.png").is_file()
    for seed, img in zip(seeds, images4):
        png = np.asarray(Image.open(tmp_path / "png" / f"{seed:06d}.png"))
        np.testing.assert_array_equal(png, img.permute(1, 2, 0).numpy())
    write_outputs(
        generate(main, seeds, guidance=guidance, batch=4, steps=STEPS, vae=vae, device="cpu"),
        tmp_path / "out.npz",
        {},
    )
    with np.load(tmp_path / "out.npz") as f:
        np.testing.assert_array_equal(f["images"], images4.permute(0, 2, 3, 1).numpy())
        np.testing.assert_array_equal(f["seeds"], seeds)


def test_per_sample_conditioning_and_generate_chunks():
    vae = tiny_vae()
    rows = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(9))
    d = denoiser(small_cond_unet(0), sd_scheduler(), encoder_hidden_states=rows)
    assert d.conditioning_batch == 3
    with pytest.raises(
        ValueError,
        match=r"net carries per-sample conditioning of batch 3, but generate "
        r"samples 5 seeds in chunks of batch=2.*batch of 1",
    ):
        generate(d, range(5), batch=2, steps=STEPS, vae=vae, device="cpu")
    with pytest.raises(ValueError, match="batch 3, but generate samples 3 seeds in chunks of batch=2"):
        generate(d, range(3), batch=2, steps=STEPS, vae=vae, device="cpu")
    shared = denoiser(small_cond_unet(1), sd_scheduler(), encoder_hidden_states=rows[:1])
    with pytest.raises(ValueError, match="guidance's guide carries per-sample conditioning of batch 3"):
        generate(shared, range(5), guidance=Autoguidance(d, 2.0), steps=STEPS, vae=vae, device="cpu")
    # One chunk holding exactly the rows' seeds: row i conditions seed i.
    _, samples, _ = run(d, [7, 8, 9], batch=4, vae=vae)
    ref, _ = reference_images(d, [7, 8, 9], 4)
    torch.testing.assert_close(samples, ref, rtol=0, atol=0)


def test_learned_variance_unet_uses_the_prediction_half():
    # A UNet with 2C output channels (variance_type learned_range) predicts eps in the first C.
    unet = small_unet(0, out_channels=6)
    d = denoiser(unet, sd_scheduler())
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    s = sigma[:, None, None, None]
    with torch.no_grad():  # the adapter's arithmetic, step by step: equal bit for bit
        eps = unet(x * (s * s + 1).rsqrt(), d.sigma_to_t(sigma).float()).sample[:, :3]
        torch.testing.assert_close(d(x, sigma), x - s * eps, rtol=0, atol=0)
    wrong = small_unet(0, out_channels=4)
    with pytest.raises(ValueError, match="returned 4 channels for 3 input channels"), torch.no_grad():
        denoiser(wrong, sd_scheduler())(x, sigma)


def test_generate_refuses_labels_it_cannot_draw():
    # A class embedding that is not a table (e.g. "timestep" type) takes labels generate cannot draw.
    unet = small_unet(0, class_embed_type="timestep")
    d = denoiser(unet, sd_scheduler())
    assert d.labels_required and d.label_dim is None
    with pytest.raises(ValueError, match="needs class labels that generate cannot draw"):
        generate(d, [0, 1], steps=STEPS, device="cpu")
    carried = denoiser(unet, sd_scheduler(), class_labels=torch.tensor([3]))
    assert not carried.labels_required
    assert next(generate(carried, [0, 1], steps=STEPS, device="cpu")).images.shape == (2, 3, 8, 8)
