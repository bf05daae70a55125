"""autoguide_fast: guide diffusion models with a bad version of themselves.

Public API (see the README):

- :func:`sample` -- EDM Heun sampler over any denoiser ``D(x, sigma, labels=None)``.
- :class:`Autoguidance`, :class:`CFG` -- guidance wrappers, with an optional guidance interval.
- :func:`seeded_noise`, :class:`PerSampleRNG` -- per-seed randomness, independent of batching.
- :func:`save`, :func:`load` -- network snapshots (safetensors + config), nothing unpickled.
- :func:`edm_sigmas`, :func:`step_plan` -- the schedule and step plan from the Rust core.
- :mod:`autoguide_fast.toy` -- the 2D toy experiment of the autoguidance paper.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from ._core import AutoguideError
from .checkpoint import load_network as load
from .checkpoint import save_network as save
from .guidance import CFG, Autoguidance, Combined, Guidance
from .sampling import PerSampleRNG, StepInfo, edm_sigmas, sample, seeded_noise, step_plan

try:
    __version__ = version("autoguide_fast")
except PackageNotFoundError:  # running from a source tree without an installed wheel
    __version__ = "0+unknown"

__all__ = [
    "CFG",
    "AutoguideError",
    "Autoguidance",
    "Combined",
    "Guidance",
    "PerSampleRNG",
    "StepInfo",
    "edm_sigmas",
    "load",
    "sample",
    "save",
    "seeded_noise",
    "step_plan",
]

_LAZY_SUBMODULES = {
    "adapters",
    "interop",
    "toy",
    "metrics",
    "ema",
    "checkpoint",
    "networks",
    "generation",
    "digits",
    "training",
    "data",
    "experiment",
    "sampling",
    "guidance",
    "kernels",
    "digits_study",
    "toy_search",
}


def __getattr__(name: str):
    # Submodules with heavier imports (matplotlib, networks) load on first use.
    if name in _LAZY_SUBMODULES:
        return import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
