"""Denoiser networks: the EDM2 magnitude-preserving U-Net and the 2D toy model."""

from .edm2 import PRESETS, Block, Precond, UNet, mp_attention
from .toy import ToyModel

__all__ = ["PRESETS", "Block", "Precond", "ToyModel", "UNet", "mp_attention"]
