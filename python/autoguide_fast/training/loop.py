"""The training loop (:func:`train`): EDM2 loss, Adam, power-function EMA, snapshots, resume,
torchrun."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import checks
from .._core import AutoguideError
from ..allocator import keep_freed_memory
from ..checkpoint import read_metadata, save_network
from ..data import ImageFiles, to_float
from ..ema import PowerFunctionEMA
from ..files import atomic_write_bytes, remove_stale_temporaries
from ..networks.edm2 import PRESETS, Precond
from ..parallel import join_process_group
from .batches import _draw, _latents, _open_data, _StepIndices, stability_encoder
from .loss import edm2_loss, learning_rate
from .options import TrainOptions
from .state import (
    SNAPSHOT_PREFIX,
    _load_state,
    _lock_run,
    _peak_memory_gb,
    _plot_losses,
    _save_state,
    _states,
    _StopRequest,
    rank_zero,
    read_stats,
)

__all__ = ["train"]


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
    opts = options or TrainOptions()
    opts.validate()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a directory, got the file {out}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    dataset = _open_data(data, stream)
    streamed = isinstance(dataset, ImageFiles)

    keep_freed_memory()  # every step's CPU tensors reuse the last step's memory (allocator)
    world, rank, device, per_rank, batch_gpu = _processes(opts, device)
    rounds = per_rank // batch_gpu
    latent = streamed and dataset.latent
    net = _network(opts, dataset, device, latent, log)
    label_dim, dtype = net.label_dim, next(net.parameters()).dtype
    ema = PowerFunctionEMA(net, opts.ema_stds)
    opt = torch.optim.Adam(net.parameters(), lr=opts.lr, betas=(0.9, 0.99), eps=1e-8)
    ddp = torch.nn.parallel.DistributedDataParallel(net) if dist.is_initialized() else net

    nimg, step = 0, 0
    states = _states(out) if out.is_dir() else []
    # One id per run, kept across resumes: post-hoc EMA refuses to mix snapshots of two runs.
    run_id = read_metadata(states[-1]).get("run_id") if states else None
    run_id = run_id or uuid.uuid4().hex
    if states:
        _check_resumable(out, states[-1], opts, dataset)
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


def _processes(opts: TrainOptions, device) -> tuple[int, int, torch.device, int, int]:
    """Joins torchrun's process group when there is one: ``(world, rank, device, per_rank,
    batch_gpu)`` with the batch split over the processes and accumulation rounds (checked)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    join_process_group()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = checks.device("device", device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and every default-device allocation use this rank's GPU
    if opts.batch % world:
        raise ValueError(f"batch ({opts.batch}) must be divisible by the number of processes ({world})")
    per_rank = opts.batch // world
    batch_gpu = min(opts.batch_gpu or per_rank, per_rank)
    if per_rank % batch_gpu:
        raise ValueError(f"batch per process ({per_rank}) must be a multiple of batch_gpu ({batch_gpu})")
    return world, rank, device, per_rank, batch_gpu


def _network(opts: TrainOptions, dataset, device: torch.device, latent: bool, log) -> Precond:
    """The preset's network at the data's shape and classes, seeded, in training mode; latent data
    give it the encoder (so generate --vae decodes its samples); fp64 runs it in float64."""
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
    net.encoder = stability_encoder(opts.vae_name) if latent else None
    return net.to(torch.float64 if opts.precision == "fp64" else torch.float32)


def _check_resumable(out: Path, state: Path, opts: TrainOptions, dataset) -> None:
    """A run folder resumes only the run it holds: the same network, EMA widths and data set."""
    meta = read_metadata(state)
    saved = TrainOptions.from_json(meta["options"])
    if (saved.preset, saved.net_kwargs, saved.cond) != (opts.preset, opts.net_kwargs, opts.cond):
        raise ValueError(
            f"{out} holds a run of another network ({saved.preset}, cond={saved.cond}); use another out"
        )
    if tuple(saved.ema_stds) != tuple(opts.ema_stds):
        raise ValueError(
            f"{out} holds a run with EMA widths {list(saved.ema_stds)}, not {list(opts.ema_stds)}: its "
            "EMA state belongs to those widths (resume with the same --ema, or use another out)"
        )
    saved_data = json.loads(meta.get("dataset", "null"))
    if saved_data is not None and saved_data != dataset.info():
        raise ValueError(
            f"{out} was trained on another data set ({saved_data}), not {dataset.info()}; use another out"
        )
