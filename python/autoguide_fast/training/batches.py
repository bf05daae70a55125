"""What each training step reads: the seeded per-step random streams (data indices, sigmas,
noise; independent of batch_gpu and the number of processes), latents drawn from stored VAE
posteriors, and the data sources (in memory, or streamed through a DataLoader)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import ImageDataset, ImageFiles, load_dataset
from ..interop.vae import EncoderInfo
from .options import TrainOptions

__all__ = ["STREAM_BYTES", "stability_encoder"]


_RNG_BLOCK = 16  # samples per random stream: results do not depend on batch_gpu or world size


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


STREAM_BYTES = 1 << 30  # data sets decoding to more than this are streamed by default


def _open_data(data, stream: bool | None):
    """An in-memory ImageDataset or a streaming ImageFiles (see :func:`train`)."""
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
