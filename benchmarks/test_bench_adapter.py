"""The diffusers adapter's cost per call (sigma -> timestep, input scaling, conditioning batch,
output parametrization) against calling the UNet directly, on CPU at a small config."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from autoguide_fast.adapters.diffusers import denoiser  # noqa: E402
from conftest import paired_times  # noqa: E402


def test_adapter_overhead(benchmark):
    """``DiffusersDenoiser(x, sigma)`` vs ``unet(x, t)`` on the same inputs (goal: ratio <= 1.03)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()
    text = torch.randn(1, 8, 16)
    d = denoiser(unet, diffusers.DDPMScheduler(prediction_type="v_prediction"), encoder_hidden_states=text)
    x, sigma = torch.randn(4, 4, 16, 16), torch.full((4,), 3.0)
    t, batch_text = d.sigma_to_t(sigma).float(), text.expand(4, -1, -1)

    def adapter():
        with torch.no_grad():
            d(x, sigma)

    def direct():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=batch_text, return_dict=False)

    # One thread: with several, the scheduling noise of the pool is larger than the overhead measured.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t_adapter, t_direct = paired_times(adapter, direct, rounds=21, warmup=3)
    finally:
        torch.set_num_threads(threads)
    ratio = t_adapter / t_direct
    benchmark.extra_info.update(adapter_s=t_adapter, direct_s=t_direct, overhead_ratio=ratio)
    print(f"\nadapter {t_adapter * 1e3:.2f} ms, direct UNet call {t_direct * 1e3:.2f} ms, ratio {ratio:.3f}")
    benchmark.pedantic(adapter, rounds=3, iterations=1)
    assert ratio <= 1.03
