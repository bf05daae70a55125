"""Seeded image generation at scale: every image depends only on its seed and the settings,
never on the batch size or the number of processes (``torchrun`` shards the seeds)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .guidance import Guidance
from .sampling import PerSampleRNG, sample

__all__ = ["Batch", "generate", "parse_seeds", "save_grid", "to_uint8"]


def parse_seeds(text: str) -> list[int]:
    """``"0-9999"`` or ``"1,5,10-19"`` -> a list of seeds (in [0, 2**63))."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"seeds must look like '0-99' or '1,5,7-9', got {text!r}") from None
        if lo_i > hi_i:
            raise ValueError(f"seeds: range {part!r} is empty")
        seeds.extend(range(lo_i, hi_i + 1))
    if not seeds:
        raise ValueError(f"seeds must name at least one seed, got {text!r}")
    if bad := [s for s in seeds if not 0 <= s < 2**63]:
        raise ValueError(f"seeds must be in [0, 2**63), got {bad[0]}")
    return seeds


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images [N, C, H, W] -> uint8 (EDM rounding)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


@dataclass
class Batch:
    """One generated batch: seeds [B], uint8 images [B, C, H, W], class indices [B] or None, and
    the sampler's output before decoding (float32 [B, C', H', W'], latents for a latent model)."""

    seeds: list[int]
    images: torch.Tensor
    classes: torch.Tensor | None
    samples: torch.Tensor | None = None


def _check_compatible(net, guidance):
    from .guidance import CFG

    for name in ("guide", "uncond"):
        other = getattr(guidance, name, None)
        if other is None:
            continue
        if isinstance(guidance, CFG):
            name = "uncond"  # a CFG guide is the unconditional model
        for attr in ("img_resolution", "img_channels"):
            a, b = getattr(net, attr, None), getattr(other, attr, None)
            if a is not None and b is not None and a != b:
                raise ValueError(f"{name} has {attr} {b}, but the main model has {a}")
        if name == "guide" and getattr(other, "label_dim", None) not in (
            None,
            getattr(net, "label_dim", None),
        ):
            raise ValueError(f"guide has label_dim {other.label_dim}, but the main model has {net.label_dim}")


def _decoder(net, vae, device):
    """Checks, before any sampling, that ``net``'s samples can become images; returns the decoder."""
    from .interop.vae import decode, load_vae

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
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    churn: float = 0.0,
    churn_min: float = 0.0,
    churn_max: float = math.inf,
    churn_noise: float = 1.0,
    vae: str | os.PathLike | torch.nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> Iterator[Batch]:
    """Yields batches of images for ``seeds`` (this process's share under ``torchrun``).

    As the official ``generate_images.py``: a seed's noise, then its class (drawn even when
    ``class_idx`` fixes it), then the churn noise come from one generator seeded with it, so images
    do not depend on batching and equal the official ones for the same network and seeds.

    Args:
        churn, churn_min, churn_max, churn_noise: EDM's S_churn, S_min, S_max and S_noise.
        vae: for a latent network (encoder ``stability_vae``): the VAE folder (diffusers
            ``save_pretrained`` layout) or a loaded ``AutoencoderKL``.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    label_dim = getattr(net, "label_dim", 0)
    if class_idx is not None and not (label_dim and 0 <= class_idx < label_dim):
        raise ValueError(f"class_idx must be in [0, {label_dim}) for this model, got {class_idx}")
    _check_compatible(net, guidance)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(seeds)[rank::world]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    decode = _decoder(net, vae, device)
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    chunks = [mine[i : i + batch] for i in range(0, len(mine), batch)]
    if progress and rank == 0:
        from tqdm.auto import tqdm

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
        x = sample(
            net, noise, labels, guidance=guidance, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max,
            rho=rho, churn=churn, churn_range=(churn_min, churn_max), churn_noise=churn_noise, generator=rng,
        )  # fmt: skip
        images = decode(x)
        yield Batch(chunk, images.cpu(), None if classes is None else classes.cpu(), x.float().cpu())


def save_grid(
    images: torch.Tensor, path: str | os.PathLike, columns: int | None = None, pad: int = 1
) -> None:
    """Writes uint8 images [N, C, H, W] as one PNG grid with ``pad``-pixel grey separators
    (nearest-neighbour upscaled when tiny)."""
    from PIL import Image

    n, c, h, w = images.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 96, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = images[i].permute(1, 2, 0)
    arr = grid.numpy()
    img = Image.fromarray(arr[:, :, 0] if c == 1 else arr)
    scale = max(1, 256 // max(h, w))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


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
    ``out`` ends with .npz), a grid PNG and ``manifest.json``. Returns the manifest."""
    from PIL import Image, PngImagePlugin

    from .checkpoint import atomic_write_bytes

    out = Path(out)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    as_npz = out.suffix == ".npz"
    if as_npz and world > 1:
        raise ValueError("an .npz output needs a single process; write PNGs under torchrun")
    root = out.parent if as_npz else out
    if root.exists() and not root.is_dir():
        raise ValueError(f"out must be a directory or a .npz path, got the file {root}")
    root.mkdir(parents=True, exist_ok=True)
    all_images, all_classes, all_seeds = [], [], []
    for b in batches:
        if as_npz or len(all_images) * b.images.shape[0] < 64:
            all_images.append(b.images)
            all_seeds.extend(b.seeds)
            if b.classes is not None:
                all_classes.append(b.classes)
        if not as_npz:
            for k, (seed, img) in enumerate(zip(b.seeds, b.images)):
                d = root / f"{seed - seed % 1000:06d}" if subdirs else root
                d.mkdir(parents=True, exist_ok=True)
                arr = img.permute(1, 2, 0).numpy()
                info = PngImagePlugin.PngInfo()
                info.add_text("seed", str(seed))
                if b.classes is not None:
                    info.add_text("class", str(int(b.classes[k])))
                Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(
                    d / f"{seed:06d}.png", pnginfo=info
                )
    images = torch.cat(all_images) if all_images else torch.zeros(0)
    if as_npz:
        arrays = dict(images=images.permute(0, 2, 3, 1).numpy(), seeds=np.array(all_seeds, dtype=np.int64))
        if all_classes:
            arrays["labels"] = torch.cat(all_classes).numpy()
        tmp = out.with_name(f".{out.name}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        if len(images):
            save_grid(images[:64], root / (f"{out.stem}-grid.png" if as_npz else "grid.png"))
        atomic_write_bytes(root / (f"{out.stem}-manifest.json" if as_npz else "manifest.json"),
                           (json.dumps(manifest, indent=2) + "\n").encode())  # fmt: skip
    return manifest
