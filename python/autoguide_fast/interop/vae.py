"""From a network's output space to RGB pixels: the encoders of the official EDM2 code.

- ``standard_rgb``: the network works on pixels in [-1, 1]; decoding is EDM's uint8 rounding.
- ``stability_vae``: the network works on latents of the Stability VAE (``stabilityai/sd-vae-ft-mse``
  for the published ImageNet-512 models), whitened per channel; decoding undoes the whitening
  (``x = (latent - bias) / scale``) and runs the VAE decoder (diffusers ``AutoencoderKL``), which is
  loaded from a local folder only: nothing is downloaded at run time.
- ``diffusers_vae``: the network (a diffusers latent UNet, Stable Diffusion family) works on the
  latents of its pipeline's ``AutoencoderKL``; decoding follows the diffusers pipelines:
  ``pixels = vae.decode(latents / scaling_factor + shift_factor)`` with the VAE's own
  ``config.scaling_factor`` and ``config.shift_factor`` (0 when absent or None), or
  ``latents * latents_std / scaling_factor + latents_mean`` when the config has those (SDXL-style
  VAEs); the pixels are in [-1, 1].
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._core import AutoguideError
from ..images import to_uint8

__all__ = ["VAE_BATCH", "EncoderInfo", "decode", "load_vae"]

# Images per VAE decoder call, as the official generate_images.py sets it (encoder_batch_size).
VAE_BATCH = 4
_KINDS = ("standard_rgb", "stability_vae", "diffusers_vae")


@dataclass(frozen=True)
class EncoderInfo:
    """How a network's samples become pixels (kept with the network, stored in its snapshot)."""

    kind: str  # "standard_rgb", "stability_vae" or "diffusers_vae"
    vae_name: str | None = None  # the VAE the latents belong to (stability_vae)
    scale: tuple[float, ...] | None = None  # per-channel whitening: final = raw * scale + bias
    bias: tuple[float, ...] | None = None
    batch_size: int = 8  # the official encoder's VAE batch (informational)

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"encoder kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "stability_vae":
            if not self.scale or not self.bias or len(self.scale) != len(self.bias):
                raise ValueError("a stability_vae encoder needs per-channel scale and bias of one length")
            if not all(v != 0 and math.isfinite(v) for v in self.scale) or not all(
                map(math.isfinite, self.bias)
            ):
                raise ValueError(
                    f"encoder scale must be finite and non-zero, bias finite, got {self.scale}, {self.bias}"
                )

    @property
    def latent(self) -> bool:
        return self.kind in ("stability_vae", "diffusers_vae")

    def to_json(self) -> str:
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()})

    @classmethod
    def from_json(cls, text: str) -> EncoderInfo:
        d = json.loads(text)
        for k in ("scale", "bias"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)

    def missing_vae_message(self) -> str:
        if self.kind == "diffusers_vae":
            return (
                "this diffusers UNet makes VAE latents (denoiser(..., latent=False) if it does not): pass "
                "its pipeline's VAE, loaded (vae=pipe.vae) or as a folder (vae='PIPELINE_DIR/vae', the "
                "layout save_pretrained writes); nothing is downloaded at run time"
            )
        return (
            f"this network makes latents of the VAE {self.vae_name!r}: download that VAE once (e.g. "
            f"`huggingface-cli download {self.vae_name} --local-dir VAE_DIR`, or a diffusers pipeline's "
            "`vae` folder) and pass its folder with --vae VAE_DIR (Python: vae=VAE_DIR); nothing is "
            "downloaded at run time"
        )


def load_vae(folder: str | os.PathLike, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A diffusers ``AutoencoderKL`` from a local folder in the layout ``save_pretrained`` writes
    (``config.json`` and the weights), in eval mode without gradients. Never downloads."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"vae: {folder} is a pipeline folder; pass its VAE folder {folder / 'vae'}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"vae: {folder} is not a VAE folder (no config.json; expected the layout that diffusers' "
            "save_pretrained writes, e.g. a downloaded stabilityai/sd-vae-ft-mse)"
        )
    try:
        from diffusers import AutoencoderKL  # optional (the `vae` extra), and heavy
    except ImportError:
        raise AutoguideError(
            "decoding latents needs diffusers: pip install 'autoguide_fast[vae]' (or pip install diffusers)"
        ) from None
    try:
        vae = AutoencoderKL.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise AutoguideError(f"vae: cannot load an AutoencoderKL from {folder}: {e}") from None
    return vae.eval().requires_grad_(False).to(device)


def decode(
    x: torch.Tensor, encoder: EncoderInfo | None, vae: torch.nn.Module | None = None, batch: int = VAE_BATCH
) -> torch.Tensor:
    """Samples [N, C, H, W] -> uint8 RGB (or grey) images [N, 3 or C, H', W'], as the official
    encoders decode them.

    Args:
        x: the sampler's output.
        encoder: how to decode; None means pixels in [-1, 1] (standard_rgb) and is refused for
            4-channel samples (latents need their VAE's scale and bias).
        vae: the loaded VAE (:func:`load_vae`), needed for a latent encoder (``stability_vae``,
            ``diffusers_vae``); it runs in its own dtype and on its own device, without gradients.
        batch: images per VAE decoder call.
    """
    if encoder is None or not encoder.latent:
        if encoder is None and x.shape[1] == 4:
            raise ValueError(
                "samples have 4 channels but the network has no encoder description: these look like "
                "VAE latents, which cannot be written as images without the VAE's scale and bias"
            )
        return to_uint8(x.to(torch.float32))
    if vae is None:
        raise ValueError(encoder.missing_vae_message())
    if encoder.kind == "diffusers_vae":
        # diffusers' pipelines decode the VAE's [-1, 1] output (VaeImageProcessor.denormalize).
        return to_uint8(_vae_decode(vae, _diffusers_unscaled(x.to(torch.float32), vae), batch).clamp(-1, 1))
    if x.shape[1] != len(encoder.scale):
        raise ValueError(f"samples have {x.shape[1]} channels, the encoder {len(encoder.scale)}")
    x = x.to(torch.float32)
    scale = torch.tensor(encoder.scale, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    bias = torch.tensor(encoder.bias, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    x = (x - bias) / scale
    # The official StabilityVAEEncoder works with the VAE in [0, 1] (it encodes x / 255).
    return _vae_decode(vae, x, batch).clamp(0, 1).mul(255).to(torch.uint8)


def _vae_decode(vae: torch.nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    # VAE output float32 [N, C, H', W'] on x's device; batches of ``batch`` in the VAE's dtype and device.
    param = next(vae.parameters())
    with torch.no_grad():
        out = [vae.decode(b.to(param.device, param.dtype))["sample"].to(x.device) for b in x.split(batch)]
    return torch.cat(out).to(torch.float32)


def _config_value(config, name: str):
    value = getattr(config, name, None)
    return config.get(name) if value is None and isinstance(config, dict) else value


def _diffusers_unscaled(x: torch.Tensor, vae: torch.nn.Module) -> torch.Tensor:
    """Latents [N, C, H, W] as the diffusers pipelines hand them to ``vae.decode``."""
    config = getattr(vae, "config", None)
    scaling = _config_value(config, "scaling_factor")
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or scaling == 0:
        raise ValueError(
            f"vae.config.scaling_factor must be a non-zero number (a diffusers AutoencoderKL), "
            f"got {scaling!r}"
        )
    channels = _config_value(config, "latent_channels")
    if channels is not None and channels != x.shape[1]:
        raise ValueError(f"samples have {x.shape[1]} channels, the VAE's latents {channels}")
    mean, std = _config_value(config, "latents_mean"), _config_value(config, "latents_std")
    if mean is not None and std is not None:  # SDXL-style per-channel statistics
        mean = torch.tensor(mean, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(std, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
        return x * std / scaling + mean
    shift = _config_value(config, "shift_factor")
    return x / scaling + (0.0 if shift is None else shift)
