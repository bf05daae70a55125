"""What defines a training run: :class:`TrainOptions`, and the published presets' official
settings (:func:`preset_defaults`)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch

from ..ema import check_std_names
from ..networks.edm2 import PRESETS

__all__ = ["TrainOptions", "preset_defaults"]


_SNAPSHOT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# The official training configurations (NVlabs/edm2 train_edm2.py): learning rate, decay after
# `decay` batches of 2048 (kimg here), dropout, duration, noise distribution; ramp-up 10 Mimg.
_OFFICIAL = {
    **{
        f"edm2-img512-{k}": (lr, 70000, d, dur, -0.4, 1.0)
        for k, lr, d, dur in (
            ("xxs", 0.0170, 0.0, 2048),
            ("xs", 0.0120, 0.0, 2048),
            ("s", 0.0100, 0.0, 2048),
            ("m", 0.0090, 0.1, 2048),
            ("l", 0.0080, 0.1, 1792),
            ("xl", 0.0070, 0.1, 1280),
            ("xxl", 0.0065, 0.1, 896),
        )
    },
    **{
        f"edm2-img64-{k}": (lr, 35000, d, dur, -0.8, 1.6)
        for k, lr, d, dur in (
            ("xs", 0.0120, 0.0, 1024),
            ("s", 0.0100, 0.0, 1024),
            ("m", 0.0090, 0.1, 2048),
            ("l", 0.0080, 0.1, 1024),
            ("xl", 0.0070, 0.1, 640),
        )
    },
}


def preset_defaults(preset: str) -> dict:
    """The official training settings of a published EDM2 preset (``edm2-img512-*``,
    ``edm2-img64-*``) as :class:`TrainOptions` fields; ``{}`` for the package's own presets.
    ``kimg`` is the official duration (2048 << 20 images = 2147483.648 kimg for img512-s)."""
    if preset not in _OFFICIAL:
        return {}
    lr, decay, dropout, mimg, p_mean, p_std = _OFFICIAL[preset]
    return dict(
        lr=lr,
        lr_decay_kimg=decay * 2048 / 1000,
        rampup_kimg=10_000.0,
        dropout=dropout,
        kimg=(mimg << 20) / 1000,
        batch=2048,
        P_mean=p_mean,
        P_std=p_std,
    )


@dataclass
class TrainOptions:
    """Everything that defines a training run (stored in every training-state checkpoint)."""

    preset: str = "digits-s"  # Network preset (networks.PRESETS); net_kwargs override it.
    net_kwargs: dict = field(default_factory=dict)
    cond: bool = True  # Class-conditional (needs labels); False trains an unconditional model.
    kimg: float = 200.0  # Training length in thousands of images.
    batch: int = 128  # Total batch size over all processes.
    batch_gpu: int | None = None  # Per-process batch per accumulation round; None = no accumulation.
    lr: float = 0.01  # Reference learning rate.
    lr_decay_kimg: float = 50.0  # Inverse-sqrt decay starts after this many kimg; 0 disables it.
    rampup_kimg: float = 2.0  # Linear learning-rate ramp-up.
    ema_stds: tuple[float, ...] = (0.050, 0.100)  # Power-function EMA widths tracked.
    snapshot_kimg: float = 25.0  # Network snapshots (one file per EMA width) every this many kimg.
    checkpoint_kimg: float = 25.0  # Training-state checkpoints every this many kimg.
    log_kimg: float = 1.0  # Stats line every this many kimg.
    P_mean: float = -0.8  # log-sigma mean of the training noise distribution.
    P_std: float = 1.6  # log-sigma std.
    dropout: float | None = None  # Overrides the preset's dropout.
    precision: str = "fp32"  # fp32; fp16 / bf16 autocast on CUDA; fp64 for reference-precision runs.
    seed: int = 0
    snapshot_dtype: str | None = None  # Network snapshots: float32/float16/bfloat16; None = the preset's.
    vae_name: str = "stabilityai/sd-vae-ft-mse"  # Latent data: the VAE its latents belong to (decoding).
    max_nonfinite: int = 100  # Consecutive steps with a NaN/inf loss before the run stops.

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        for name in ("kimg", "lr", "snapshot_kimg", "checkpoint_kimg", "log_kimg"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not (isinstance(self.batch, int) and self.batch >= 1):
            raise ValueError(f"batch must be a positive integer, got {self.batch!r}")
        if self.batch_gpu is not None and not (isinstance(self.batch_gpu, int) and self.batch_gpu >= 1):
            raise ValueError(f"batch_gpu must be None or a positive integer, got {self.batch_gpu!r}")
        if self.precision not in ("fp32", "fp16", "bf16", "fp64"):
            raise ValueError(f"precision must be fp32, fp16, bf16 or fp64, got {self.precision!r}")
        for name in ("lr_decay_kimg", "rampup_kimg"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0 (0 = none), got {v!r}")
        if not self.ema_stds:
            raise ValueError("ema_stds must list at least one EMA width")
        if len(set(self.ema_stds)) != len(self.ema_stds):
            raise ValueError(f"ema_stds must be distinct (one snapshot file per width), got {self.ema_stds}")
        check_std_names(self.ema_stds, "ema_stds")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("P_mean", "P_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not self.P_std > 0:
            raise ValueError(f"P_std must be > 0, got {self.P_std}")
        if self.snapshot_dtype not in (None, *_SNAPSHOT_DTYPES):
            raise ValueError(
                f"snapshot_dtype must be None or one of {list(_SNAPSHOT_DTYPES)}, got {self.snapshot_dtype!r}"
            )
        if (
            isinstance(self.max_nonfinite, bool)
            or not isinstance(self.max_nonfinite, int)
            or self.max_nonfinite < 1
        ):
            raise ValueError(f"max_nonfinite must be a positive integer, got {self.max_nonfinite!r}")
        if self.kimg * 1000 < self.batch:
            raise ValueError(f"kimg must cover at least one batch ({self.batch} images), got {self.kimg}")

    def snapshot_torch_dtype(self) -> torch.dtype | None:
        """The dtype network snapshots are cast to: float16 for the published presets (as the
        official snapshots), None (the training dtype) otherwise, unless ``snapshot_dtype`` says."""
        name = self.snapshot_dtype or ("float16" if self.preset.startswith("edm2-") else None)
        return None if name is None else _SNAPSHOT_DTYPES[name]

    def to_json(self) -> str:
        d = asdict(self)
        d["ema_stds"] = list(self.ema_stds)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainOptions:
        d = json.loads(text)
        d["ema_stds"] = tuple(d["ema_stds"])
        return cls(**d)
