"""The official EDM2 and autoguidance generation presets (NVlabs/edm2, ``generate_images.py``) as data.

A preset names the post-hoc EMA reconstruction(s) to sample from, the guidance weight, and the
number the paper reports for it (FID or FD_DINOv2, ImageNet 512x512 or 64x64). Files are looked up
on disk by their official names, never fetched: :func:`locate` says where to download missing ones.

- :data:`PRESETS`: every official preset by name, in the official order; :func:`get` one by name.
- :func:`parse_official_name`, :func:`official_nimg`: the training length and EMA length that an
  official file name encodes (``<prefix>-<kimg, 7 digits>-<ema std>.pkl``).
- :func:`table`: the presets as plain text (``autoguide presets``).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

__all__ = [
    "KINDS",
    "METRICS",
    "MODEL_ROOT",
    "PRESETS",
    "OfficialName",
    "Preset",
    "get",
    "locate",
    "official_nimg",
    "parse_official_name",
    "table",
]

MODEL_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
KINDS = ("none", "cfg", "autoguidance")
METRICS = ("fid", "fd_dinov2")

# A converted file keeps the official name with the extension swapped.
_OFFICIAL_NAME = re.compile(r"(?P<prefix>.+)-(?P<kimg>\d{7})-(?P<std>\d+\.\d+)\.(?:pkl|safetensors)")


class OfficialName(NamedTuple):
    """What an official file name encodes."""

    prefix: str  # model, e.g. "edm2-img512-xs-uncond"
    kimg: int  # training length in thousands of images, rounded down (nimg // 1000)
    ema_std: float  # relative standard deviation of the post-hoc EMA profile (EDM2, Sec. 3.1)


def parse_official_name(name: str) -> OfficialName:
    """Split an official file name ``<prefix>-<kimg, 7 digits>-<ema std>.pkl`` (or the same name with
    ``.safetensors``) into ``(prefix, kimg, ema_std)``; ValueError naming the file if it does not match.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a file name (str), got {type(name).__name__}")
    m = _OFFICIAL_NAME.fullmatch(name)
    if m is None:
        raise ValueError(
            f"{name!r} is not an official EDM2 file name (<prefix>-<kimg, 7 digits>-<ema std>.pkl, "
            f"e.g. 'edm2-img512-s-2147483-0.070.pkl')"
        )
    return OfficialName(m["prefix"], int(m["kimg"]), float(m["std"]))


def official_nimg(kimg: int) -> int:
    """Training length in images from the ``kimg`` of an official file name, as the official tools
    recover it: snapshots are taken at multiples of 1024 images, so the largest such multiple whose
    thousands are ``kimg``. ValueError if no multiple of 1024 has ``kimg`` thousands (e.g. 42).
    """
    if isinstance(kimg, bool) or not isinstance(kimg, int) or kimg < 0:
        raise ValueError(f"kimg must be a non-negative integer, got {kimg!r}")
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    if nimg // 1000 != kimg:
        raise ValueError(f"kimg={kimg} is not the training length of any snapshot (a multiple of 1024)")
    return nimg


def _kind(net: str, gnet: str | None) -> str:
    # A conditional net guided by an unconditional one is classifier-free guidance; a net guided by a
    # smaller, shorter-trained version of itself (conditional or not) is autoguidance.
    if gnet is None:
        return "none"
    if "-uncond-" in gnet and "-uncond-" not in net:
        return "cfg"
    return "autoguidance"


@dataclass(frozen=True)
class Preset:
    """One official generation preset.

    Attributes:
        name: the official preset name, e.g. ``"edm2-img512-s-autog-fid"``.
        net: official file name of the main network, e.g. ``"edm2-img512-s-2147483-0.070.pkl"``.
        gnet: official file name of the guiding network; None = no guidance.
        guidance: guidance weight (``gnet(x).lerp(net(x), guidance)``); 1.0 = no guidance.
        kind: ``"none"``, ``"cfg"`` (the guiding network is an unconditional model and the main one
            is not) or ``"autoguidance"`` (guided by a worse version of itself).
        metric: ``"fid"`` or ``"fd_dinov2"``, the metric the preset's EMA length and weight optimise.
        value: that metric as the paper reports it.
    """

    name: str
    net: str
    gnet: str | None
    guidance: float
    kind: str
    metric: str
    value: float

    def __post_init__(self):
        for file in self.files:
            parse_official_name(file)
        if (self.gnet is None) != (self.guidance == 1.0):
            raise ValueError(
                f"preset {self.name!r}: gnet={self.gnet!r} with guidance={self.guidance!r} "
                f"(a guiding network goes with guidance != 1 and only then)"
            )
        if self.kind != _kind(self.net, self.gnet):
            raise ValueError(
                f"preset {self.name!r}: kind={self.kind!r}, but net={self.net!r} with gnet={self.gnet!r} "
                f"is {_kind(self.net, self.gnet)!r}"
            )
        if self.metric not in METRICS:
            raise ValueError(f"preset {self.name!r}: metric must be one of {METRICS}, got {self.metric!r}")

    @property
    def files(self) -> tuple[str, ...]:
        """Official file names: the main network, then the guiding network if any."""
        return (self.net,) if self.gnet is None else (self.net, self.gnet)

    def url(self, file: str) -> str:
        """Official download address of one of :attr:`files`."""
        if file not in self.files:
            raise ValueError(f"file must be one of preset {self.name!r}'s files {self.files}, got {file!r}")
        return f"{MODEL_ROOT}/{file}"

    @property
    def ema_std(self) -> float:
        """Relative standard deviation of the main network's post-hoc EMA profile."""
        return parse_official_name(self.net).ema_std

    @property
    def nimg(self) -> int:
        """Training length of the main network, in images."""
        return official_nimg(parse_official_name(self.net).kimg)

    @property
    def gnet_ema_std(self) -> float | None:
        """Relative standard deviation of the guiding network's EMA profile; None without one."""
        return None if self.gnet is None else parse_official_name(self.gnet).ema_std

    @property
    def gnet_nimg(self) -> int | None:
        """Training length of the guiding network, in images; None without one."""
        return None if self.gnet is None else official_nimg(parse_official_name(self.gnet).kimg)


def _preset(
    name: str, net: str, gnet: str | None = None, guidance: float = 1.0, *, fid=None, fd_dinov2=None
) -> Preset:
    metric, value = ("fid", fid) if fd_dinov2 is None else ("fd_dinov2", fd_dinov2)
    return Preset(name, net, gnet, float(guidance), _kind(net, gnet), metric, float(value))


# Values: the metric in the comment after each official preset (the paper's tables).
# fmt: off
PRESETS: MappingProxyType[str, Preset] = MappingProxyType({p.name: p for p in (
    # Unguided (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion models").
    _preset("edm2-img512-xs-fid",   "edm2-img512-xs-2147483-0.135.pkl",  fid=3.53),
    _preset("edm2-img512-xs-dino",  "edm2-img512-xs-2147483-0.200.pkl",  fd_dinov2=103.39),
    _preset("edm2-img512-s-fid",    "edm2-img512-s-2147483-0.130.pkl",   fid=2.56),
    _preset("edm2-img512-s-dino",   "edm2-img512-s-2147483-0.190.pkl",   fd_dinov2=68.64),
    _preset("edm2-img512-m-fid",    "edm2-img512-m-2147483-0.100.pkl",   fid=2.25),
    _preset("edm2-img512-m-dino",   "edm2-img512-m-2147483-0.155.pkl",   fd_dinov2=58.44),
    _preset("edm2-img512-l-fid",    "edm2-img512-l-1879048-0.085.pkl",   fid=2.06),
    _preset("edm2-img512-l-dino",   "edm2-img512-l-1879048-0.155.pkl",   fd_dinov2=52.25),
    _preset("edm2-img512-xl-fid",   "edm2-img512-xl-1342177-0.085.pkl",  fid=1.96),
    _preset("edm2-img512-xl-dino",  "edm2-img512-xl-1342177-0.155.pkl",  fd_dinov2=45.96),
    _preset("edm2-img512-xxl-fid",  "edm2-img512-xxl-0939524-0.070.pkl", fid=1.91),
    _preset("edm2-img512-xxl-dino", "edm2-img512-xxl-0939524-0.150.pkl", fd_dinov2=42.84),
    _preset("edm2-img64-s-fid",     "edm2-img64-s-1073741-0.075.pkl",    fid=1.58),
    _preset("edm2-img64-m-fid",     "edm2-img64-m-2147483-0.060.pkl",    fid=1.43),
    _preset("edm2-img64-l-fid",     "edm2-img64-l-1073741-0.040.pkl",    fid=1.33),
    _preset("edm2-img64-xl-fid",    "edm2-img64-xl-0671088-0.040.pkl",   fid=1.33),
    # Classifier-free guidance by the unconditional XS model at the main network's EMA length.
    _preset("edm2-img512-xs-guid-fid",   "edm2-img512-xs-2147483-0.045.pkl",
            "edm2-img512-xs-uncond-2147483-0.045.pkl", 1.40, fid=2.91),
    _preset("edm2-img512-xs-guid-dino",  "edm2-img512-xs-2147483-0.150.pkl",
            "edm2-img512-xs-uncond-2147483-0.150.pkl", 1.70, fd_dinov2=79.94),
    _preset("edm2-img512-s-guid-fid",    "edm2-img512-s-2147483-0.025.pkl",
            "edm2-img512-xs-uncond-2147483-0.025.pkl", 1.40, fid=2.23),
    _preset("edm2-img512-s-guid-dino",   "edm2-img512-s-2147483-0.085.pkl",
            "edm2-img512-xs-uncond-2147483-0.085.pkl", 1.90, fd_dinov2=52.32),
    _preset("edm2-img512-m-guid-fid",    "edm2-img512-m-2147483-0.030.pkl",
            "edm2-img512-xs-uncond-2147483-0.030.pkl", 1.20, fid=2.01),
    _preset("edm2-img512-m-guid-dino",   "edm2-img512-m-2147483-0.015.pkl",
            "edm2-img512-xs-uncond-2147483-0.015.pkl", 2.00, fd_dinov2=41.98),
    _preset("edm2-img512-l-guid-fid",    "edm2-img512-l-1879048-0.015.pkl",
            "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.20, fid=1.88),
    _preset("edm2-img512-l-guid-dino",   "edm2-img512-l-1879048-0.035.pkl",
            "edm2-img512-xs-uncond-2147483-0.035.pkl", 1.70, fd_dinov2=38.20),
    _preset("edm2-img512-xl-guid-fid",   "edm2-img512-xl-1342177-0.020.pkl",
            "edm2-img512-xs-uncond-2147483-0.020.pkl", 1.20, fid=1.85),
    _preset("edm2-img512-xl-guid-dino",  "edm2-img512-xl-1342177-0.030.pkl",
            "edm2-img512-xs-uncond-2147483-0.030.pkl", 1.70, fd_dinov2=35.67),
    _preset("edm2-img512-xxl-guid-fid",  "edm2-img512-xxl-0939524-0.015.pkl",
            "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.20, fid=1.81),
    _preset("edm2-img512-xxl-guid-dino", "edm2-img512-xxl-0939524-0.015.pkl",
            "edm2-img512-xs-uncond-2147483-0.015.pkl", 1.70, fd_dinov2=33.09),
    # Autoguidance by a smaller model trained for less time (Karras et al. 2024, "Guiding a diffusion
    # model with a bad version of itself").
    _preset("edm2-img512-s-autog-fid",         "edm2-img512-s-2147483-0.070.pkl",
            "edm2-img512-xs-0134217-0.125.pkl",        2.10, fid=1.34),
    _preset("edm2-img512-s-autog-dino",        "edm2-img512-s-2147483-0.120.pkl",
            "edm2-img512-xs-0134217-0.165.pkl",        2.45, fd_dinov2=36.67),
    _preset("edm2-img512-xxl-autog-fid",       "edm2-img512-xxl-0939524-0.075.pkl",
            "edm2-img512-m-0268435-0.155.pkl",         2.05, fid=1.25),
    _preset("edm2-img512-xxl-autog-dino",      "edm2-img512-xxl-0939524-0.130.pkl",
            "edm2-img512-m-0268435-0.205.pkl",         2.30, fd_dinov2=24.18),
    _preset("edm2-img512-s-uncond-autog-fid",  "edm2-img512-s-uncond-2147483-0.070.pkl",
            "edm2-img512-xs-uncond-0134217-0.110.pkl", 2.85, fid=3.86),
    _preset("edm2-img512-s-uncond-autog-dino", "edm2-img512-s-uncond-2147483-0.090.pkl",
            "edm2-img512-xs-uncond-0134217-0.125.pkl", 2.90, fd_dinov2=90.39),
    _preset("edm2-img64-s-autog-fid",          "edm2-img64-s-1073741-0.045.pkl",
            "edm2-img64-xs-0134217-0.110.pkl",         1.70, fid=1.01),
    _preset("edm2-img64-s-autog-dino",         "edm2-img64-s-1073741-0.105.pkl",
            "edm2-img64-xs-0134217-0.175.pkl",         2.20, fd_dinov2=31.85),
)})
# fmt: on


def get(name: str) -> Preset:
    """The official preset called ``name``; ValueError with the closest names if there is none."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a preset name (str), got {type(name).__name__}")
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else "see 'autoguide presets' for the list"
    raise ValueError(f"unknown preset {name!r}; {hint}")


def locate(preset: Preset, models_dir: str | os.PathLike) -> dict[str, Path]:
    """Find the files of ``preset`` in the directory ``models_dir``, by their official names; a
    converted file of the same name with ``.safetensors`` instead of ``.pkl`` is preferred.

    Returns:
        ``{"net": path}``, plus ``"gnet": path`` for a guided preset.

    Raises:
        FileNotFoundError: ``models_dir`` is not a directory, or files are missing; the message then
            lists the official download address of every missing file, one per line.
    """
    if not isinstance(preset, Preset):
        raise TypeError(f"preset must be a Preset (see presets.get), got {type(preset).__name__}")
    folder = Path(models_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"models_dir {str(folder)!r} is not a directory")
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, file in zip(("net", "gnet"), preset.files):
        candidates = [folder / (file.removesuffix(".pkl") + ".safetensors"), folder / file]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(preset.url(file))
        else:
            found[role] = path
    if missing:
        raise FileNotFoundError(
            f"preset {preset.name!r}: {len(missing)} model file(s) not in {str(folder)!r} "
            f"(as .pkl or converted .safetensors); official downloads:\n" + "\n".join(missing)
        )
    return found


def table(kind: str | None = None) -> str:
    """The presets as a plain-text table, one per line in the official order, with a header: name,
    kind, net, gnet, guidance, metric=value. ``kind``: only presets of that kind; None = all.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or None, got {kind!r}")
    rows = [("name", "kind", "net", "gnet", "guidance", "metric")]
    rows += [
        (p.name, p.kind, p.net, p.gnet or "-", f"{p.guidance:.2f}", f"{p.metric}={p.value:.2f}")
        for p in PRESETS.values()
        if kind is None or p.kind == kind
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1] for row in rows
    )
