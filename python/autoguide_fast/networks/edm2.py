"""EDM2 magnitude-preserving U-Net and preconditioning (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Figure 21). State-dict keys and shapes
equal the official implementation's, so its weights map one to one."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import kernels
from .mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample

__all__ = ["PRESETS", "Block", "Precond", "UNet", "mp_attention"]


# Self-attention with pixel-normalised q, k, v read from the qkv convolution output [N, 3C, H, W]
# viewed as [N, heads, C/heads, 3, H*W]; returns [N, C, H, W] (Figure 21, "attention"). Dispatches
# to the fused CUDA kernel on GPUs and to the torch reference elsewhere (autoguide_fast.kernels).
def mp_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    return kernels.mp_attention(qkv, num_heads)


class Block(torch.nn.Module):
    """U-Net encoder or decoder block with optional self-attention; ``block(x, emb)``."""

    def __init__(
        self,
        in_channels: int,  # Number of input channels.
        out_channels: int,  # Number of output channels.
        emb_channels: int,  # Number of embedding channels.
        flavor: str = "enc",  # 'enc' (skip before the residual) or 'dec' (skip after it).
        resample_mode: str = "keep",  # 'keep', 'up' or 'down'.
        resample_filter: Sequence[float] = (1, 1),  # Separable resampling filter.
        attention: bool = False,  # Self-attention after the residual branch?
        channels_per_head: int = 64,  # Channels per head: out_channels // channels_per_head heads (0 = none).
        dropout: float = 0.0,  # Dropout probability in the residual branch (training only).
        res_balance: float = 0.3,  # Balance between main branch (0) and residual branch (1).
        attn_balance: float = 0.3,  # Balance between main branch (0) and self-attention (1).
        clip_act: float | None = 256,  # Clip output activations to +-clip_act; None = no clipping.
    ):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        if resample_mode not in ("keep", "up", "down"):
            raise ValueError(f"resample_mode must be 'keep', 'up' or 'down', got {resample_mode!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = (
            MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        )
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch.
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm

        # Residual branch, modulated by the embedding.
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c.unsqueeze(2).unsqueeze(3).to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        # Connect the branches.
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        # Self-attention.
        if self.num_heads != 0:
            y = self.attn_proj(mp_attention(self.attn_qkv(x), self.num_heads))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x


class UNet(torch.nn.Module):
    """EDM2 U-Net: ``unet(x, noise_labels, class_labels)`` with x [N, C, H, W], noise_labels [N],
    class_labels [N, label_dim] or None."""

    def __init__(
        self,
        img_resolution: int,  # Image resolution.
        img_channels: int,  # Image channels.
        label_dim: int,  # Class label dimensionality; 0 = unconditional.
        model_channels: int = 192,  # Base multiplier for the number of channels.
        channel_mult: Sequence[int] = (1, 2, 3, 4),  # Per-resolution channel multipliers.
        channel_mult_noise: int | None = None,  # Noise embedding multiplier; None = channel_mult[0].
        channel_mult_emb: int | None = None,  # Final embedding multiplier; None = max(channel_mult).
        num_blocks: int = 3,  # Residual blocks per resolution.
        attn_resolutions: Sequence[int] = (16, 8),  # Resolutions with self-attention.
        label_balance: float = 0.5,  # Balance between noise embedding (0) and class embedding (1).
        concat_balance: float = 0.5,  # Balance between skip connections (0) and main path (1).
        **block_kwargs,  # Arguments for Block.
    ):
        super().__init__()
        cblock = [model_channels * m for m in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=[3, 3])
            else:
                self.enc[f"{res}x{res}_down"] = Block(
                    cout, cout, cemb, flavor="enc", resample_mode="down", **block_kwargs
                )
            for idx in range(num_blocks):
                cin, cout = cout, channels
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="enc", attention=attn, **block_kwargs
                )

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(
                    cout, cout, cemb, flavor="dec", attention=True, **block_kwargs
                )
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(
                    cout, cout, cemb, flavor="dec", resample_mode="up", **block_kwargs
                )
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = Block(
                    cin, cout, cemb, flavor="dec", attention=attn, **block_kwargs
                )
        self.out_conv = MPConv(cout, img_channels, kernel=[3, 3])

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None
    ) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(
                emb, self.emb_label(class_labels * math.sqrt(class_labels.shape[1])), t=self.label_balance
            )
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if "conv" in name else block(x, emb)
            skips.append(x)

        for name, block in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


def check_input(net, x) -> None:
    """``x`` must be a tensor [N, img_channels, H, W]: a ValueError naming the shapes, not a
    convolution's RuntimeError deep inside the network."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != net.img_channels:
        raise ValueError(
            f"x must have shape [N, {net.img_channels}, H, W] for this network, got {tuple(x.shape)}"
        )


class Precond(torch.nn.Module):
    """EDM preconditioning around :class:`UNet` with learned uncertainty; a denoiser:
    ``net(x, sigma, class_labels=None, return_logvar=False)`` with x [N, C, H, W], sigma 0-d or [N],
    class_labels None or [N, label_dim]. Returns D(x; sigma) [N, C, H, W] (and log-variance [N, 1, 1, 1])."""

    def __init__(
        self,
        img_resolution: int,  # Image resolution.
        img_channels: int,  # Image channels.
        label_dim: int,  # Class label dimensionality; 0 = unconditional.
        use_fp16: bool = True,  # Run the U-Net in float16 on CUDA devices?
        sigma_data: float = 0.5,  # Expected standard deviation of the training data.
        logvar_channels: int = 128,  # Intermediate dimensionality for uncertainty estimation.
        **unet_kwargs,  # Keyword arguments for UNet (and Block).
    ):
        super().__init__()
        for name, v in (("img_resolution", img_resolution), ("img_channels", img_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(label_dim, bool) or not isinstance(label_dim, int) or label_dim < 0:
            raise ValueError(f"label_dim must be an integer >= 0, got {label_dim!r}")
        self._config = dict(
            img_resolution=img_resolution,
            img_channels=img_channels,
            label_dim=label_dim,
            use_fp16=use_fp16,
            sigma_data=sigma_data,
            logvar_channels=logvar_channels,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in unet_kwargs.items()},
        )
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs
        )
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def config(self) -> dict:
        """Constructor arguments (JSON-serialisable)."""
        return dict(self._config)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        return_logvar: bool = False,
    ):
        check_input(self, x)
        # float32 as the official network; float64 stays float64 (reference-precision runs).
        outer = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(outer)
        sigma = torch.as_tensor(sigma, dtype=outer, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device, dtype=outer)
        else:
            class_labels = class_labels.to(outer).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else outer

        # Preconditioning weights (EDM, Table 1).
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels)
        D_x = c_skip * x + c_out * F_x.to(outer)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar  # u(sigma), Eq. 21
        return D_x


def _img512(model_channels: int) -> dict:
    return dict(img_resolution=64, img_channels=4, label_dim=1000, model_channels=model_channels)


def _img64(model_channels: int) -> dict:
    return dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=model_channels)


def _small(res: int, channels: int, **unet) -> dict:
    # CPU-sized networks: 10 classes, float32.
    return dict(img_resolution=res, img_channels=channels, label_dim=10, use_fp16=False, **unet)


# Constructor arguments of Precond by name. The published EDM2 models (ImageNet-512 on 64x64x4
# latents, ImageNet-64 on pixels) and small CPU-sized presets for 8x8 (digits) and 32x32 images.
PRESETS: dict[str, dict] = {
    **{
        f"edm2-img512-{k}": _img512(c)
        for k, c in dict(xxs=64, xs=128, s=192, m=256, l=320, xl=384, xxl=448).items()
    },
    **{f"edm2-img64-{k}": _img64(c) for k, c in dict(xs=128, s=192, m=256, l=320, xl=384).items()},
    # 8x8 images (e.g. the digits set), 10 classes: 4.0 M parameters and guides of 0.7 M and 0.2 M.
    "digits-s": _small(8, 1, model_channels=64, channel_mult=[1, 2], num_blocks=2, attn_resolutions=[4]),
    "digits-xs": _small(8, 1, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    "digits-xxs": _small(8, 1, model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]),
    # 32x32 RGB images, 10 classes: 6.8 M and 1.2 M parameters.
    "img32-s": _small(32, 3, model_channels=64, channel_mult=[1, 2, 2], num_blocks=2, attn_resolutions=[8]),
    "img32-xs": _small(32, 3, model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8]),
}
