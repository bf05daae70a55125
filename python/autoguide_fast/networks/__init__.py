"""Denoiser networks: magnitude-preserving building blocks and the 2D toy model."""

from .toy import ToyModel

__all__ = ["ToyModel"]
