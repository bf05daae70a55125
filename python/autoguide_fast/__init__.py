"""autoguide_fast: guide diffusion models with a bad version of themselves.

Public API (see the README):

- :func:`sample` -- EDM Heun sampler over any denoiser ``D(x, sigma, labels=None)``.
- :class:`Autoguidance`, :class:`CFG`, :class:`Combined` -- guidance wrappers, with an optional
  guidance interval.
- :func:`seeded_noise`, :class:`PerSampleRNG` -- per-seed randomness, independent of batching.
- :func:`save`, :func:`load` -- network snapshots (safetensors + config), nothing unpickled.
- :func:`edm_sigmas`, :func:`step_plan` -- the schedule and step plan from the Rust core.

The library's modules (``sampling``, ``generation``, ``training``, ``ema``, ``metrics``, ``data``,
...) and the studies (:mod:`autoguide_fast.studies`: the toy experiment, the digits studies,
sweeps) load on first use: ``import autoguide_fast`` imports neither torch nor anything else
heavy until a name is used.
"""

from __future__ import annotations

import warnings
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ._core import AutoguideError

if TYPE_CHECKING:  # what the names below resolve to, for type checkers and editors
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

# Public name -> (module, attribute).
_API = {
    "load": ("checkpoint", "load_network"),
    "save": ("checkpoint", "save_network"),
    **{n: ("guidance", n) for n in ("CFG", "Autoguidance", "Combined", "Guidance")},
    **{
        n: ("sampling", n)
        for n in ("PerSampleRNG", "StepInfo", "edm_sigmas", "sample", "seeded_noise", "step_plan")
    },
}
_SUBMODULES = set(
    "adapters allocator checkpoint checks cli data ema files generation guidance interop kernels metrics "
    "networks parallel sampling studies training".split()
)
# Where the studies lived before they moved to autoguide_fast.studies (deprecated names).
_MOVED = {
    "toy": "studies.toy",
    "toy_search": "studies.toy_search",
    "digits": "studies.digits",
    "digits_study": "studies.digits_study",
    "dataset_tool": "data.tool",
}


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        value = getattr(import_module(f".{module}", __name__), attr)
    elif name in _SUBMODULES:
        value = import_module(f".{name}", __name__)
    elif name in _MOVED:
        warnings.warn(
            f"autoguide_fast.{name} moved to autoguide_fast.{_MOVED[name]}", DeprecationWarning, stacklevel=2
        )
        return import_module(f".{_MOVED[name]}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API, *_SUBMODULES})
