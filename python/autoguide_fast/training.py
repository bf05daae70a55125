"""EDM2 training (Karras et al. 2024): the loss with learned uncertainty, the learning-rate
schedule, and the training loop (power-function EMA, snapshots, resumable checkpoints, torchrun)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ._core import AutoguideError
from .ema import PowerFunctionEMA, check_std_names

__all__ = ["TrainOptions", "edm2_loss", "learning_rate", "train"]


def edm2_loss(
    net: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    sigma: torch.Tensor | None = None,
    scaled_noise: torch.Tensor | None = None,
    P_mean: float = -0.4,
    P_std: float = 1.0,
    generator: torch.Generator | None = None,
    sigma_data: float | None = None,
) -> torch.Tensor:
    """Per-element EDM2 loss [N, C, H, W] with learned uncertainty ``u(sigma)`` (Eq. 21):
    ``(weight / exp(u)) * (D(y + n; sigma) - y)^2 + u`` with ``weight = (s^2 + sd^2) / (s sd)^2``.

    Args:
        net: a :class:`~autoguide_fast.networks.Precond` (needs ``return_logvar``).
        images: clean data ``y`` [N, C, H, W].
        labels: None or [N, label_dim].
        sigma: noise levels [N]; default ``exp(N(P_mean, P_std^2))``.
        scaled_noise: noise already multiplied by sigma [N, C, H, W]; default drawn here.
        generator: source of the random sigma and noise.
        sigma_data: defaults to ``net.sigma_data`` (pass it when ``net`` is wrapped, e.g. by DDP).
    """
    n = images.shape[0]
    if sigma is None:
        sigma = (torch.randn(n, generator=generator, device=images.device) * P_std + P_mean).exp()
    sigma = sigma.reshape(-1, 1, 1, 1).to(images.dtype)
    if scaled_noise is None:
        scaled_noise = torch.randn(images.shape, generator=generator, device=images.device) * sigma
    sd = net.sigma_data if sigma_data is None else sigma_data
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoised, logvar = net(images + scaled_noise, sigma, labels, return_logvar=True)
    return (weight / logvar.exp()) * (denoised - images) ** 2 + logvar


def learning_rate(step_nimg: float, ref_lr: float, ref_nimg: float, rampup_nimg: float = 0.0) -> float:
    """EDM2 inverse-square-root decay ``ref_lr / sqrt(max(t / t_ref, 1))`` (``ref_nimg`` 0: no
    decay), with an optional linear ramp-up over the first ``rampup_nimg`` images."""
    if not ref_nimg >= 0:
        raise ValueError(f"ref_nimg must be >= 0 (0 = no decay), got {ref_nimg}")
    lr = ref_lr / math.sqrt(max(step_nimg / ref_nimg, 1.0)) if ref_nimg > 0 else ref_lr
    if rampup_nimg > 0:
        lr *= min(step_nimg / rampup_nimg, 1.0)
    return lr


# ---------------------------------------------------------------------------------------------
# Training loop.

STATE_PREFIX = "training-state-"
SNAPSHOT_PREFIX = "network-snapshot-"
_RNG_BLOCK = 16  # samples per random stream: results do not depend on batch_gpu or world size


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
        from .networks.edm2 import PRESETS

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


def _stream(seed: int, step: int, block: int, device: torch.device) -> torch.Generator:
    # Independent, reproducible random stream per (seed, step, block of samples).
    state = np.random.SeedSequence([seed, step, block]).generate_state(1, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(state) & (2**63 - 1))


def _blocks(lo: int, hi: int) -> tuple[range, slice]:
    start = lo - (lo // _RNG_BLOCK) * _RNG_BLOCK
    return range(lo // _RNG_BLOCK, (hi - 1) // _RNG_BLOCK + 1), slice(start, start + hi - lo)


def _indices(opts: TrainOptions, step: int, lo: int, hi: int, num_images: int) -> torch.Tensor:
    """Data indices [hi - lo] (CPU) of global batch samples [lo, hi) of ``step``: the first draw
    of each block's stream, so that a data loader can read them ahead of the step."""
    blocks, sl = _blocks(lo, hi)
    cpu = torch.device("cpu")
    draws = [
        torch.randint(num_images, (_RNG_BLOCK,), generator=_stream(opts.seed, step, b, cpu)) for b in blocks
    ]
    return torch.cat(draws)[sl]


def _draw(opts: TrainOptions, step: int, lo: int, hi: int, num_images: int, shape, device, latent=False):
    """Indices, sigmas and unit noise of global batch samples [lo, hi) of ``step``; for latent
    data also the unit noise that draws each latent from its VAE posterior."""
    blocks, sl = _blocks(lo, hi)
    sig, noise, post = [], [], []
    for block in blocks:
        g = _stream(opts.seed, step, block, device)
        torch.randint(num_images, (_RNG_BLOCK,), generator=g, device=device)  # the indices' draw
        sig.append((torch.randn(_RNG_BLOCK, generator=g, device=device) * opts.P_std + opts.P_mean).exp())
        noise.append(torch.randn(_RNG_BLOCK, *shape, generator=g, device=device))
        if latent:
            post.append(torch.randn(_RNG_BLOCK, *shape, generator=g, device=device))
    idx = _indices(opts, step, lo, hi, num_images).to(device)
    return idx, torch.cat(sig)[sl], torch.cat(noise)[sl], torch.cat(post)[sl] if latent else None


# The official StabilityVAEEncoder's whitening of raw latents (per channel, float32 arithmetic).
_RAW_MEAN, _RAW_STD, _FINAL_MEAN, _FINAL_STD = (5.81, 3.25, 0.12, -2.15), (4.17, 4.62, 3.71, 3.28), 0.0, 0.5


def stability_encoder(vae_name: str):
    """The :class:`~autoguide_fast.interop.vae.EncoderInfo` of latents made by the official
    ``dataset_tool.py encode``: ``final = raw * scale + bias`` with the official constants."""
    from .interop.vae import EncoderInfo

    scale = np.float32(_FINAL_STD) / np.array(_RAW_STD, np.float32)
    bias = np.float32(_FINAL_MEAN) - np.array(_RAW_MEAN, np.float32) * scale
    return EncoderInfo(
        "stability_vae", vae_name=vae_name, scale=tuple(map(float, scale)), bias=tuple(map(float, bias))
    )


def _latents(raw: torch.Tensor, eps: torch.Tensor, encoder) -> torch.Tensor:
    """Final latents [B, C, H, W] from stored (mean, std) [B, 2C, H, W] and unit noise: the
    official ``encode_latents``, ``(mean + eps * std) * scale + bias`` in float32."""
    mean, std = raw.to(torch.float32).chunk(2, dim=1)
    scale = torch.tensor(encoder.scale, dtype=torch.float32, device=raw.device).reshape(1, -1, 1, 1)
    bias = torch.tensor(encoder.bias, dtype=torch.float32, device=raw.device).reshape(1, -1, 1, 1)
    return (mean + eps.to(torch.float32) * std) * scale + bias


class _StepIndices:
    """The data indices each accumulation round of this rank reads, step after step from
    ``step``: a DataLoader ``batch_sampler`` that lets workers decode the images ahead."""

    def __init__(
        self, opts: TrainOptions, step: int, rounds: int, rank: int, world: int, batch_gpu: int, n: int
    ):
        self.opts, self.step, self.rounds, self.rank, self.world, self.batch_gpu, self.n = (
            opts,
            step,
            rounds,
            rank,
            world,
            batch_gpu,
            n,
        )

    def __iter__(self):
        step = self.step
        while True:
            for r in range(self.rounds):
                lo = (r * self.world + self.rank) * self.batch_gpu
                yield _indices(self.opts, step, lo, lo + self.batch_gpu, self.n).tolist()
            step += 1


def _states(out: Path) -> list[Path]:
    return sorted(out.glob(f"{STATE_PREFIX}*.safetensors"))


def _save_state(
    out: Path,
    net,
    ema: PowerFunctionEMA,
    opt,
    nimg: int,
    step: int,
    opts: TrainOptions,
    data_info,
    run_id: str,
):
    from .checkpoint import save

    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    for i, e in enumerate(ema.emas):
        tensors.update({f"ema{i}.{k}": v for k, v in e.state_dict().items()})
    for j, p in enumerate(net.parameters()):
        for k, v in opt.state.get(p, {}).items():
            tensors[f"optim.{j}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    meta = dict(
        nimg=str(nimg),
        step=str(step),
        options=opts.to_json(),
        config=json.dumps(net.config),
        dataset=json.dumps(data_info),
        format="autoguide_fast.training-state/1",
        run_id=run_id,
    )
    path = out / f"{STATE_PREFIX}{nimg:09d}.safetensors"
    save(tensors, path, meta)
    for old in _states(out)[:-2]:  # keep the two newest
        old.unlink(missing_ok=True)
    return path


def _load_state(path: Path, net, ema: PowerFunctionEMA, opt, device) -> tuple[int, int]:
    from .checkpoint import Snapshot

    with Snapshot(path) as snap:
        net.load_state_dict({k[4:]: v for k, v in snap.items() if k.startswith("net.")})
        for i, e in enumerate(ema.emas):
            e.load_state_dict({k[len(f"ema{i}.") :]: v for k, v in snap.items() if k.startswith(f"ema{i}.")})
        state = {}
        for k, v in snap.items():
            if k.startswith("optim."):
                _, j, name = k.split(".", 2)
                state.setdefault(int(j), {})[name] = v.clone().to(device)
        opt.load_state_dict(dict(state=state, param_groups=opt.state_dict()["param_groups"]))
        return int(snap.metadata["nimg"]), int(snap.metadata["step"])


def _lock_run(out: Path):
    """An exclusive lock on the run folder for the life of a training run (released by close, or
    by the system when the process dies): two runs writing one folder would interleave."""
    import fcntl  # POSIX

    f = open(out / "train.lock", "a")  # held open for the run; the caller closes it
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(
            f"{out}: another training run is writing this folder (it holds {out / 'train.lock'})"
        ) from None
    return f


def read_stats(path: Path) -> list[dict]:
    """The rows of a run's ``stats.jsonl``. A last line without its newline is the partial write
    of a killed process and is dropped; any other bad line is an error naming the file and line."""
    # split("\n") ends with what follows the last newline: "" after a finished write.
    lines = path.read_text().split("\n")[:-1]
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{path}:{i}: not a stats line ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("nimg"), int):
            raise ValueError(f"{path}:{i}: not a stats line (no integer 'nimg')")
        rows.append(row)
    return rows


def _plot_losses(stats_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import save_figure

    if not stats_path.exists():  # a checkpoint before the first stats line
        return
    rows = [r for r in read_stats(stats_path) if r.get("loss") is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["kimg"] for r in rows], [r["loss"] for r in rows], marker="o" if len(rows) < 20 else None)
    ax.set_xlabel("kimg")
    ax.set_ylabel("EDM2 loss (with uncertainty)")
    ax.grid(alpha=0.3)
    save_figure(fig, png, dpi=100)


STREAM_BYTES = 1 << 30  # data sets decoding to more than this are streamed by default


def _open_data(data, stream: bool | None):
    """An in-memory ImageDataset or a streaming ImageFiles (see :func:`train`)."""
    from .data import ImageDataset, ImageFiles, load_dataset

    if isinstance(data, (ImageDataset, ImageFiles)):
        if stream and isinstance(data, ImageDataset):
            raise ValueError("stream=True needs a file source, not an in-memory ImageDataset")
        return data
    if str(data) == "digits" or Path(data).suffix.lower() == ".npz":
        return load_dataset(data)  # in memory by nature
    files = ImageFiles(data)
    c, h, w = files.shape
    if files.latent and stream is False:
        raise ValueError(f"{data}: latent data sets are streamed (data loading 'memory' is for images)")
    if files.latent or stream or (stream is None and len(files) * c * h * w > STREAM_BYTES):
        return files
    return load_dataset(data)


def rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: the device's allocator on CUDA, resident memory else."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # POSIX; ru_maxrss is in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop writes a checkpoint and returns."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(
    data,
    out: str | Path,
    options: TrainOptions | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: torch.device | str | None = None,
    stream: bool | None = None,
    workers: int = 2,
) -> dict:
    """Trains an EDM2 network on ``data`` (an :class:`~autoguide_fast.data.ImageDataset`, an
    :class:`~autoguide_fast.data.ImageFiles`, or a source for either) into the run directory ``out``.

    A data set is held in memory (and on the device) when small; a larger one (decoded size over
    :data:`STREAM_BYTES`, or ``stream=True``) is streamed: ``workers`` DataLoader processes decode
    each step's images ahead of it, so host memory grows with the batch, not the data set. Both
    read the same images in the same order (the indices come from the seeded per-step streams),
    so a run's results do not depend on the choice.

    Resumes automatically from the newest training-state checkpoint in ``out``. Under
    ``torchrun`` every process takes its share of each batch (DDP; NCCL on GPUs, gloo on CPUs).
    Writes network snapshots per EMA width, training-state checkpoints, ``stats.jsonl`` and
    ``loss.png``. Returns a summary (final nimg, status, files)."""
    from .checkpoint import atomic_write_bytes, read_metadata, remove_stale_temporaries, save_network
    from .data import ImageFiles, to_float
    from .networks.edm2 import PRESETS, Precond

    opts = options or TrainOptions()
    opts.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory, got the file {out}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    dataset = _open_data(data, stream)
    streamed = isinstance(dataset, ImageFiles)

    # Distributed set-up.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device is None:
        device = torch.device(
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and every default-device allocation use this rank's GPU
    if opts.batch % world:
        raise ValueError(f"batch ({opts.batch}) must be divisible by the number of processes ({world})")
    per_rank = opts.batch // world
    batch_gpu = min(opts.batch_gpu or per_rank, per_rank)
    if per_rank % batch_gpu:
        raise ValueError(f"batch per process ({per_rank}) must be a multiple of batch_gpu ({batch_gpu})")
    rounds = per_rank // batch_gpu

    # Network, checked against the data.
    cfg = dict(PRESETS[opts.preset], **opts.net_kwargs)
    label_dim = dataset.num_classes if opts.cond else 0
    if opts.cond and dataset.labels is None:
        raise ValueError(f"data set {dataset.name!r} has no labels: train with cond=False (--uncond)")
    preset_shape = (PRESETS[opts.preset]["img_channels"], PRESETS[opts.preset]["img_resolution"])
    if preset_shape != (dataset.channels, dataset.resolution) and rank_zero():
        log(
            f"note: preset {opts.preset} is made for {preset_shape[1]}x{preset_shape[1]}x{preset_shape[0]}; "
            f"this trains it at the data's {dataset.resolution}x{dataset.resolution}x{dataset.channels}"
        )
    cfg.update(img_resolution=dataset.resolution, img_channels=dataset.channels, label_dim=label_dim)
    if opts.dropout is not None:
        cfg["dropout"] = opts.dropout
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        net = Precond(**cfg).to(device).train().requires_grad_(True)
    latent = streamed and dataset.latent
    # Latent data: the network and its snapshots carry the encoder, so generate --vae decodes them.
    net.encoder = stability_encoder(opts.vae_name) if latent else None
    # fp64 holds the weights and runs the network in float64 (slow; for checking numerics).
    dtype = torch.float64 if opts.precision == "fp64" else torch.float32
    net.to(dtype)
    ema = PowerFunctionEMA(net, opts.ema_stds)
    opt = torch.optim.Adam(net.parameters(), lr=opts.lr, betas=(0.9, 0.99), eps=1e-8)
    ddp = torch.nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net

    nimg, step = 0, 0
    states = _states(out) if out.is_dir() else []
    # One id per run, kept across resumes: post-hoc EMA refuses to mix snapshots of two runs.
    run_id = read_metadata(states[-1]).get("run_id") if states else None
    run_id = run_id or uuid.uuid4().hex
    if states:
        saved = TrainOptions.from_json(read_metadata(states[-1])["options"])
        if (saved.preset, saved.net_kwargs, saved.cond) != (opts.preset, opts.net_kwargs, opts.cond):
            raise ValueError(
                f"{out} holds a run of another network ({saved.preset}, cond={saved.cond}); use another out"
            )
        if tuple(saved.ema_stds) != tuple(opts.ema_stds):
            raise ValueError(
                f"{out} holds a run with EMA widths {list(saved.ema_stds)}, not {list(opts.ema_stds)}: its "
                "EMA state belongs to those widths (resume with the same --ema, or use another out)"
            )
        saved_data = json.loads(read_metadata(states[-1]).get("dataset", "null"))
        if saved_data is not None and saved_data != dataset.info():
            raise ValueError(
                f"{out} was trained on another data set ({saved_data}), not {dataset.info()}; use another out"
            )
        nimg, step = _load_state(states[-1], net, ema, opt, device)
        log(f"resuming from {states[-1]} at {nimg / 1000:.1f} kimg")
    # Dropout and anything else that draws from torch's global generator: a stream per rank (not
    # the same masks on every GPU), reproducible from the seed and the step a run starts at.
    torch.manual_seed(int(np.random.SeedSequence([opts.seed, rank, step, 1]).generate_state(1)[0]))
    lock = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        lock = _lock_run(out)
    try:
        if rank == 0:
            remove_stale_temporaries(out)  # left by writers that were killed mid-write
        stats_path, total = out / "stats.jsonl", int(opts.kimg * 1000)
        if rank == 0 and stats_path.exists():  # drop lines past the resumed state
            keep = [json.dumps(r) for r in read_stats(stats_path) if r["nimg"] <= nimg]
            atomic_write_bytes(stats_path, "".join(ln + "\n" for ln in keep).encode())

        def every(kimg: float, before: int, after: int) -> bool:
            k = max(1, int(kimg * 1000))
            return after // k > before // k

        shape = (dataset.channels, dataset.resolution, dataset.resolution)
        n_images = len(dataset)
        labels = dataset.labels.to(device) if (dataset.labels is not None and opts.cond) else None
        if streamed:
            loader = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_sampler=_StepIndices(opts, step, rounds, rank, world, batch_gpu, n_images),
                    num_workers=workers,
                    prefetch_factor=2 if workers else None,
                    pin_memory=device.type == "cuda",
                    persistent_workers=False,
                )
            )
        else:
            images = dataset.images.to(device)
        snapshot_dtype = opts.snapshot_torch_dtype()
        autocast = (
            dict(fp16=torch.float16, bf16=torch.bfloat16).get(opts.precision)
            if device.type == "cuda"
            else None
        )
        bar = None
        if progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total, initial=min(nimg, total), unit="img", unit_scale=True, desc=f"train {out.name}"
            )
        window, t_window, status = [], time.perf_counter(), "done"
        bad_in_a_row, bad_in_window = 0, 0
        with _StopRequest() as stop:
            while nimg < total:
                for g in opt.param_groups:
                    g["lr"] = learning_rate(nimg, opts.lr, opts.lr_decay_kimg * 1000, opts.rampup_kimg * 1000)
                opt.zero_grad(set_to_none=True)
                loss_sum = torch.zeros((), device=device, dtype=dtype)
                for r in range(rounds):
                    lo = (r * world + rank) * batch_gpu
                    idx, sigma, noise, post = _draw(
                        opts, step, lo, lo + batch_gpu, n_images, shape, device, latent
                    )
                    raw = next(loader).to(device, non_blocking=True) if streamed else images[idx]
                    x = _latents(raw, post, net.encoder) if latent else to_float(raw)
                    x, sigma, noise = x.to(dtype), sigma.to(dtype), noise.to(dtype)
                    y = (
                        None
                        if labels is None
                        else torch.nn.functional.one_hot(labels[idx], label_dim).to(dtype)
                    )
                    sync = contextlib.nullcontext() if (r == rounds - 1 or ddp is net) else ddp.no_sync()
                    with sync, torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                        loss = edm2_loss(
                            ddp,
                            x,
                            y,
                            sigma=sigma,
                            scaled_noise=noise * sigma.reshape(-1, 1, 1, 1),
                            sigma_data=net.sigma_data,
                        )
                        loss = loss.sum() / per_rank
                        loss.backward()
                    loss_sum += loss.detach()
                if dist.is_initialized():
                    dist.all_reduce(loss_sum)
                    loss_sum /= world
                loss_value = float(loss_sum) / (shape[0] * shape[1] * shape[2])
                # A NaN/inf loss (every process sees the same reduced value): as the official loop, its
                # non-finite gradients become 0 and training goes on; it is counted in stats.jsonl, and
                # only a streak of max_nonfinite such steps stops the run.
                bad = not math.isfinite(loss_value)
                bad_in_a_row, bad_in_window = (bad_in_a_row + 1 if bad else 0), bad_in_window + bad
                if bad_in_a_row >= opts.max_nonfinite:
                    raise AutoguideError(
                        f"training diverged: the loss was NaN/inf for {bad_in_a_row} steps in a row, up to "
                        f"step {step} ({nimg / 1000:g} kimg); the newest checkpoint in {out} is kept: resume "
                        "with a lower --lr"
                    )
                for p in net.parameters():
                    if p.grad is not None:
                        torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
                opt.step()
                before, nimg, step = nimg, nimg + opts.batch, step + 1
                ema.update(nimg, opts.batch)
                if not bad:
                    window.append(loss_value)
                if bar is not None:
                    bar.update(min(nimg, total) - min(before, total))
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
                done = nimg >= total
                if rank == 0 and (every(opts.log_kimg, before, nimg) or done):
                    dt = time.perf_counter() - t_window
                    steps_done = len(window) + bad_in_window
                    row = dict(
                        nimg=nimg,
                        kimg=nimg / 1000,
                        loss=sum(window) / len(window) if window else None,
                        lr=opt.param_groups[0]["lr"],
                        img_per_s=steps_done * opts.batch / max(dt, 1e-9),
                        sec_per_kimg=dt / max(steps_done * opts.batch / 1000, 1e-9),
                        peak_mem_gb=_peak_memory_gb(device),
                        nonfinite_steps=bad_in_window,
                        time=time.time(),
                    )
                    with stats_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    window, t_window, bad_in_window = [], time.perf_counter(), 0
                # Nothing is written while the loss is non-finite: the files keep the last good state.
                writable = bad_in_a_row == 0
                if rank == 0 and writable and (every(opts.snapshot_kimg, before, nimg) or done):
                    for std, e in zip(ema.stds, ema.emas):
                        save_network(
                            e,
                            out / f"{SNAPSHOT_PREFIX}{nimg:09d}-{std:.3f}.safetensors",
                            nimg=nimg,
                            ema_std=std,
                            dataset=dataset.info(),
                            cond=opts.cond,
                            run=run_id,
                            dtype=snapshot_dtype,
                        )
                stopping = stop.signal is not None
                if dist.is_initialized():  # every process stops at the same step
                    flag = torch.tensor([int(stopping)], device=device)
                    dist.all_reduce(flag)
                    stopping = bool(flag.item())
                if rank == 0 and writable and (every(opts.checkpoint_kimg, before, nimg) or done or stopping):
                    _save_state(out, net, ema, opt, nimg, step, opts, dataset.info(), run_id)
                    _plot_losses(stats_path, out / "loss.png")
                if stopping and not done:
                    status = "interrupted"
                    log(
                        f"stopped by signal at {nimg / 1000:.1f} kimg; checkpoint written, run again to "
                        "resume"
                    )
                    break
        if bar is not None:
            bar.close()
        if dist.is_initialized():
            dist.barrier()
        return dict(status=status, nimg=nimg, step=step, out=str(out))
    finally:
        if lock is not None:
            lock.close()
