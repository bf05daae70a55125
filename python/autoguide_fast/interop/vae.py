"""From a network's output space to RGB pixels: the encoders of the official EDM2 code.

- ``standard_rgb``: the network works on pixels in [-1, 1]; decoding is EDM's uint8 rounding.
- ``stability_vae``: the network works on latents of the Stability VAE (``stabilityai/sd-vae-ft-mse``
  for the published ImageNet-512 models), whitened per channel; decoding undoes the whitening
  (``x = (latent - bias) / scale``) and runs the VAE decoder (diffusers ``AutoencoderKL``), which is
  loaded from a local folder only: nothing is downloaded at run time.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .._core import AutoguideError

__all__ = ["VAE_BATCH", "EncoderInfo", "decode", "load_vae"]

# Images per VAE decoder call, as the official generate_images.py sets it (encoder_batch_size).
VAE_BATCH = 4
_KINDS = ("standard_rgb", "stability_vae")


@dataclass(frozen=True)
class EncoderInfo:
    """How a network's samples become pixels (kept with the network, stored in its snapshot)."""

    kind: str  # "standard_rgb" or "stability_vae"
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
            if not all(v != 0 for v in self.scale):
                raise ValueError(f"encoder scale must be non-zero, got {self.scale}")

    @property
    def latent(self) -> bool:
        return self.kind == "stability_vae"

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
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"vae: {folder} is not a VAE folder (no config.json; expected the layout that diffusers' "
            "save_pretrained writes, e.g. a downloaded stabilityai/sd-vae-ft-mse)"
        )
    try:
        from diffusers import AutoencoderKL
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
        vae: the loaded VAE (:func:`load_vae`), needed for a ``stability_vae`` encoder.
        batch: images per VAE decoder call.
    """
    if encoder is None or not encoder.latent:
        if encoder is None and x.shape[1] == 4:
            raise ValueError(
                "samples have 4 channels but the network has no encoder description: these look like "
                "VAE latents, which cannot be written as images without the VAE's scale and bias"
            )
        from ..generation import to_uint8

        return to_uint8(x.to(torch.float32))
    if vae is None:
        raise ValueError(encoder.missing_vae_message())
    if x.shape[1] != len(encoder.scale):
        raise ValueError(f"samples have {x.shape[1]} channels, the encoder {len(encoder.scale)}")
    x = x.to(torch.float32)
    scale = torch.tensor(encoder.scale, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    bias = torch.tensor(encoder.bias, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    x = (x - bias) / scale
    vae_dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        pixels = torch.cat([vae.decode(b.to(vae_dtype))["sample"] for b in x.split(batch)])
    # The official StabilityVAEEncoder works with the VAE in [0, 1] (it encodes x / 255).
    return pixels.to(torch.float32).clamp(0, 1).mul(255).to(torch.uint8)
