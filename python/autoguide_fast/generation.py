"""Seeded image generation at scale: every image's noise, class and churn noise depend only on
its seed and the settings, never on the batch size or the number of processes (``torchrun``
shards the seeds). The images themselves are equal across batch sizes up to the network's own
arithmetic: where a backend rounds a batched matrix product differently for another batch size
(torch's CPU GEMMs do, for some diffusers UNets), a pixel may move by one level."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from . import checks, kernels
from .allocator import keep_freed_memory
from .files import atomic_path, atomic_write_bytes, remove_stale_temporaries, strict_json
from .guidance import Guidance
from .images import save_grid
from .interop.vae import decode, load_vae
from .networks import fast
from .sampling import PerSampleRNG, check_inputs, heun

__all__ = ["Batch", "compact_seeds", "generate", "rank_batches", "write_outputs"]


@dataclass
class Batch:
    """One generated batch: seeds [B], uint8 images [B, C, H, W], class indices [B] or None, and
    the sampler's output before decoding (float32 [B, C', H', W'], latents for a latent model)."""

    seeds: list[int]
    images: torch.Tensor
    classes: torch.Tensor | None
    samples: torch.Tensor | None = None


def _decoder(net, vae, device):
    """Checks, before any sampling, that ``net``'s samples can become images; returns the decoder."""
    encoder = getattr(net, "encoder", None)
    channels = getattr(net, "img_channels", None)
    if encoder is None and channels == 4:
        raise ValueError(
            "the network makes 4-channel samples and has no encoder description: these look like VAE "
            "latents, which cannot be written as images (convert or load the official pickle, which "
            "carries its encoder)"
        )
    if encoder is not None and encoder.latent:
        if vae is None:
            raise ValueError(encoder.missing_vae_message())
        if isinstance(vae, (str, os.PathLike)):
            vae = load_vae(vae, device)
    return lambda x: decode(x, encoder, vae)


def generate(
    net: torch.nn.Module,
    seeds: Sequence[int],
    *,
    guidance: Guidance | None = None,
    class_idx: int | None = None,
    batch: int = 64,
    steps: int = 32,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    churn: float = 0.0,
    churn_min: float = 0.0,
    churn_max: float = math.inf,
    churn_noise: float = 1.0,
    vae: str | os.PathLike | torch.nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Iterator[Batch]:
    """Yields batches of images for ``seeds`` (this process's share under ``torchrun``: the
    official split, see :func:`rank_batches`).

    As the official ``generate_images.py``: a seed's noise, then its class (drawn even when
    ``class_idx`` fixes it), then the churn noise come from one generator seeded with it, so images
    do not depend on batching and equal the official ones for the same network and seeds.

    ``net`` is an image model: it has ``img_channels`` and ``img_resolution`` (square samples), and
    optionally ``label_dim`` (a class per seed is drawn and passed as one-hot labels) and
    ``encoder`` (how samples become pixels). The package's networks and
    :func:`autoguide_fast.adapters.diffusers.denoiser` (diffusers UNets) are.

    Args:
        net: the main model. Conditioning a diffusers denoiser carries (prompt embeddings) must
            have a batch of 1, shared by every seed: seeds are sampled in chunks of ``batch``.
        seeds: one image per seed.
        guidance: None, ``Autoguidance(guide, w)``, ``CFG(uncond, w)`` or ``Combined(...)``.
        class_idx: a fixed class for every image (conditional models); None draws one per seed.
        batch: seeds per sampler call (images do not depend on it).
        steps, rho: the EDM schedule.
        sigma_min, sigma_max: None: EDM's 0.002 / 80 limited to the range ``net`` declares
            (a diffusers denoiser's training grid; see :func:`autoguide_fast.sampling.sigma_range`).
        churn, churn_min, churn_max, churn_noise: EDM's S_churn, S_min, S_max and S_noise.
        vae: for a latent network: the VAE folder (diffusers ``save_pretrained`` layout, e.g. a
            pipeline's ``vae/``) or a loaded ``AutoencoderKL`` (``pipe.vae``). Encoder
            ``stability_vae`` (EDM2 latent models) decodes as the official code, ``diffusers_vae``
            (diffusers latent UNets) as the diffusers pipelines.
        device: where noise and samples live (default: CUDA when available).
        progress: a progress bar over the batches (rank 0).

    Yields:
        :class:`Batch` per chunk of seeds: uint8 images [B, C, H, W].
    """
    checks.integer("batch", batch, 1)
    if not all(isinstance(getattr(net, a, None), int) for a in ("img_channels", "img_resolution")):
        raise TypeError(
            f"net must be an image model (img_channels, img_resolution), got {type(net).__name__}"
        )
    label_dim = getattr(net, "label_dim", 0)
    if getattr(net, "labels_required", False) and not label_dim:
        raise ValueError(
            "net needs class labels that generate cannot draw (its class embedding is not a table of "
            "classes): carry them in the denoiser (denoiser(unet, scheduler, class_labels=...)), or call "
            "sample() with your own labels"
        )
    kernels.mode()  # a bad AUTOGUIDE_KERNELS is named here, before a caller creates any output
    fast.mode()  # and a bad AUTOGUIDE_EDM2
    if class_idx is not None:
        if not label_dim:
            raise ValueError(f"class_idx must be None: the model is unconditional, got {class_idx!r}")
        checks.integer("class_idx", class_idx, 0, label_dim - 1)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    dummy = torch.empty(1, *shape, device="meta")  # shapes only: checked once, sampled per batch
    plan = check_inputs(
        net,
        dummy,
        dummy.new_empty(1, label_dim) if label_dim else None,
        guidance=guidance,
        steps=steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        churn=churn,
        churn_range=(churn_min, churn_max),
        churn_noise=churn_noise,
    )
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    seeds = checks.seeds("seeds", seeds)
    _check_conditioning_batch(net, guidance, len(seeds), batch, world)
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    device = checks.device("device", device)
    decode = _decoder(net, vae, device)
    chunks = [[seeds[i] for i in b] for b in rank_batches(len(seeds), batch, rank, world) if len(b)]
    # Everything is checked above, before the first batch is asked for (and before a caller
    # such as write_outputs creates anything).
    # EDM2 networks on CPU: the fast inference path (networks.fast, AUTOGUIDE_EDM2), built once
    # for every batch, and compiled under `auto` when this process's work pays for it.
    calls = sum(len(c) for c in chunks) * sum(1 + step.second_order for step in plan)
    keep_freed_memory()  # see sample()
    net, guidance = fast.accelerate(net, guidance, torch.empty(0, device=device), calls)
    sampler = dict(plan=plan, guidance=guidance, churn_noise=churn_noise)
    return _batches(net, chunks, shape, label_dim, class_idx, sampler, decode, device, progress and rank == 0)


def rank_batches(n: int, batch: int, rank: int = 0, world: int = 1) -> list[np.ndarray]:
    """The official split of ``n`` items over ``world`` processes (``generate_images.py``,
    ``calculate_metrics.py``): ``world`` times as many near-equal contiguous batches as needed for
    at most ``batch`` items each, dealt round-robin; rank r takes batches r, r + world, ... Every
    rank gets the same number of batches (some may be empty); indices [k]."""
    count = max((n - 1) // (batch * world) + 1, 1) * world
    return np.array_split(np.arange(n), count)[rank::world]


def _check_conditioning_batch(net, guidance, n_seeds: int, batch: int, world: int) -> None:
    """Per-sample conditioning rows (a diffusers denoiser's ``conditioning_batch`` B > 1) go to the
    samples of one sampler call in order; generate's chunks of ``batch`` seeds (and torchrun's
    shards) would pair rows with seeds by position in the chunk, so only B == every seed in one
    chunk is meaningful."""
    models = [("net", net)] + [(f"guidance's {role}", m) for role, m in getattr(guidance, "models", [])]
    for role, m in models:
        b = getattr(m, "conditioning_batch", 1)
        if b != 1 and not (world == 1 and b == n_seeds and batch >= b):
            raise ValueError(
                f"{role} carries per-sample conditioning of batch {b}, but generate samples {n_seeds} "
                f"seeds in chunks of batch={batch} ({world} process(es)); give it a batch of 1 "
                f"(shared by every seed), or exactly {b} seeds with batch >= {b}, or call sample() "
                "with your own noise"
            )


def _batches(net, chunks, shape, label_dim, class_idx, sampler, decode, device, progress):
    if progress:
        chunks = tqdm(chunks, desc="generate", unit="batch")
    for chunk in chunks:
        rng = PerSampleRNG(chunk, device)
        noise = rng.randn(shape)
        classes = labels = None
        if label_dim:
            classes = rng.randint(label_dim)
            if class_idx is not None:
                classes = torch.full_like(classes, class_idx)
            labels = torch.nn.functional.one_hot(classes, label_dim).float()
        x = heun(net, noise, labels, generator=rng, **sampler)
        images = decode(x)
        yield Batch(chunk, images.cpu(), None if classes is None else classes.cpu(), x.float().cpu())


def compact_seeds(seeds: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, seeds = [], sorted(set(seeds))
    start = prev = None
    for s in seeds + [None]:
        if s is not None and prev is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = s
    return ",".join(out)


def write_outputs(
    batches: Iterator[Batch], out: str | os.PathLike, manifest: dict, subdirs: bool = False
) -> dict:
    """Writes PNGs (one per seed, optionally in subdirectories of 1000) or one ``.npz`` (when
    ``out`` ends with .npz), a grid PNG beside them (``<out>-grid.png``) and ``manifest.json``
    (under torchrun with each rank's seeds), every file atomically. The manifest
    says how many images were written and whether the run completed (an interrupted run still
    leaves a manifest and a grid of what it made). Returns the manifest."""
    out = Path(out)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    as_npz = out.suffix == ".npz"
    if as_npz and world > 1:
        raise ValueError("an .npz output needs a single process; write PNGs under torchrun")
    if as_npz and out.exists() and not out.is_file():
        raise ValueError(f"out names {out}, which exists and is not a file")
    root = out.parent if as_npz else out
    if root.exists() and not root.is_dir():
        raise ValueError(f"out must be a directory or a .npz path, got the file {root}")
    # The preview grid sits beside an image folder, not in it: metric tools read every image there.
    grid_path = root / f"{out.stem}-grid.png" if as_npz else out.parent / f"{out.name}-grid.png"
    manifest_path = root / (f"{out.stem}-manifest.json" if as_npz else "manifest.json")
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    grid, all_images, all_classes, all_seeds = [], [], [], []
    written, mine = 0, []

    def finish(complete: bool) -> None:
        if world > 1 and complete:  # which process made which seeds (every rank takes part)
            shares = [None] * world
            dist.all_gather_object(shares, compact_seeds(mine))
            manifest["ranks"] = shares
        if rank != 0:
            return
        if grid:
            save_grid(torch.cat(grid)[:64], grid_path)
        result = dict(manifest, complete=complete)
        if not complete:
            result["images_written"] = written
        atomic_write_bytes(manifest_path, (strict_json(result, indent=2) + "\n").encode())
        manifest.update(result)

    try:
        for b in batches:
            mine.extend(b.seeds)
            if sum(len(g) for g in grid) < 64:
                grid.append(b.images)
            if as_npz:
                all_images.append(b.images)
                all_seeds.extend(b.seeds)
                if b.classes is not None:
                    all_classes.append(b.classes)
                continue
            for k, (seed, img) in enumerate(zip(b.seeds, b.images)):
                d = root / f"{seed - seed % 1000:06d}" if subdirs else root
                arr = img.permute(1, 2, 0).numpy()
                info = PngImagePlugin.PngInfo()
                info.add_text("seed", str(seed))
                if b.classes is not None:
                    info.add_text("class", str(int(b.classes[k])))
                # Atomic, not fsynced: a dying process never leaves half an image; they can be redone.
                with atomic_path(d / f"{seed:06d}.png", fsync=False) as tmp:
                    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(tmp, "PNG", pnginfo=info)
                written += 1
        if as_npz:
            images = torch.cat(all_images) if all_images else torch.zeros(0, 1, 1, 1, dtype=torch.uint8)
            arrays = dict(
                images=images.permute(0, 2, 3, 1).numpy(), seeds=np.array(all_seeds, dtype=np.int64)
            )
            if all_classes:
                arrays["labels"] = torch.cat(all_classes).numpy()
            with atomic_path(out) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
            written = len(all_seeds)
    except BaseException:
        if not as_npz:  # what was written is described; an .npz is all or nothing
            finish(complete=False)
        raise
    if dist.is_initialized():
        dist.barrier()
    finish(complete=True)
    return manifest
