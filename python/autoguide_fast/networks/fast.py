"""Inference path for EDM2 networks on CPUs: :func:`optimize` returns a denoiser
``D(x, sigma, labels=None)`` equal to :class:`~autoguide_fast.networks.edm2.Precond` within
float32 rounding, that evaluates faster.

What it changes, all exact in real arithmetic (float32 rounding moves by a few ulp per layer):

- the normalised weights are computed once, with every constant scale of the magnitude-preserving
  layers folded into the convolution that consumes it: mp_silu's 1 / 0.596 into the next
  convolution, mp_sum's ``t / sqrt((1 - t)^2 + t^2)`` into the residual (and attention) branch's
  last convolution, the gains into their layers. mp_sum is then one ``add`` with ``alpha``;
- the per-block embedding layers run as one matrix product;
- resampling with the default (1, 1) filter is 2x2 average pooling (down) or nearest upsampling
  (up) instead of a depthwise (transposed) convolution;
- activations are channels_last (oneDNN's native layout: no reorders around each convolution);
- optionally (``compile=True``) the whole forward is compiled by ``torch.compile`` (inductor with
  freezing: pointwise operations fused into oneDNN convolutions with prepacked weights), once per
  batch size. A compiler failure (no C++ compiler, say) warns once and the eager path serves.

:func:`autoguide_fast.sample` and :func:`autoguide_fast.generate` use it for EDM2 networks on CPU
float32 inputs, as ``AUTOGUIDE_EDM2`` says: ``fast``: the eager fast path; ``compile``: compiled
too (compiling costs 10-120 s per network and batch size on a 2-core machine; its gain is
measured by ``benchmarks/test_bench_edm2.py``); ``auto`` (default): ``fast``, and compiled for a
``generate`` run long enough to pay for it (:data:`COMPILE_WORTH_MACS`); ``plain``: the network
as it is; ``bf16``: the eager fast path computing the U-Net in bfloat16 (opt-in, not exact: see
:class:`FastPrecond`).

The weights are a snapshot taken by :func:`optimize`: build it again after changing the network.
"""

from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn.functional as F

from ..kernels import reference
from .compiling import warn_compile_failure
from .edm2 import Block, Precond, check_input
from .mp import _SILU_STD, MPConv, normalize, resample

__all__ = ["FastPrecond", "accelerate", "for_sampling", "mode", "optimize"]

# AUTOGUIDE_EDM2 values: the plain network, the eager fast path, the compiled one, the rule, or
# the eager fast path with bfloat16 arithmetic (opt-in: it changes the samples, see FastPrecond).
_MODES = ("plain", "fast", "compile", "auto", "bf16")


def _mp_sum_scales(t: float) -> tuple[float, float]:
    # mp_sum(a, b, t) = a (1 - t) / s + b t / s with s = sqrt((1 - t)^2 + t^2) (Eq. 88).
    s = math.sqrt((1 - t) ** 2 + t**2)
    return (1 - t) / s, t / s


def _weight(conv: MPConv, scale: float = 1.0, gain=1) -> torch.Tensor:
    # The weight MPConv applies in float32, times a constant scale folded in from a neighbour.
    with torch.no_grad():
        w = conv.effective_weight(torch.float32, gain).detach().clone()
    return w * scale if scale != 1.0 else w


class _FastBlock(torch.nn.Module):
    """:class:`~autoguide_fast.networks.edm2.Block` with folded constants; ``block(x, c)`` with
    ``c`` the block's modulation ``emb_linear(emb) + 1`` [N, C, 1, 1]."""

    def __init__(self, block: Block, res: int):
        super().__init__()
        self.enc = block.flavor == "enc"
        self.mode = block.resample_mode
        self.filter = list(block.resample_filter)
        self.num_heads = block.num_heads
        self.clip = block.clip_act
        self.alpha_res, beta_res = _mp_sum_scales(block.res_balance)
        self.alpha_attn, beta_attn = _mp_sum_scales(block.attn_balance)
        self.register_buffer("res0", _weight(block.conv_res0, 1 / _SILU_STD))
        self.register_buffer("res1", _weight(block.conv_res1, beta_res / _SILU_STD))
        none = torch.empty(0)
        self.register_buffer("skip", _weight(block.conv_skip) if block.conv_skip is not None else none)
        self.register_buffer("qkv", _weight(block.attn_qkv) if self.num_heads else none)
        self.register_buffer("proj", _weight(block.attn_proj, beta_attn) if self.num_heads else none)
        # Multiply-adds per sample of the convolutions, nearly all of the work (res: the output's).
        self.macs = sum(t.numel() for t in (self.res0, self.res1, self.skip, self.qkv, self.proj)) * res**2

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.mode != "keep" and self.filter == [1, 1]:
            # resample with the (1, 1) filter: a 2x2 box average, or each pixel repeated 2x2.
            x = F.avg_pool2d(x, 2) if self.mode == "down" else F.interpolate(x, scale_factor=2.0)
        else:
            x = resample(x, f=self.filter, mode=self.mode)
        if self.enc:
            if self.skip.numel():
                x = F.conv2d(x, self.skip)
            x = normalize(x, dim=1)
        y = F.conv2d(F.silu(x), self.res0, padding=1)
        y = F.conv2d(F.silu(y * c), self.res1, padding=1)
        if not self.enc and self.skip.numel():
            x = F.conv2d(x, self.skip)
        x = torch.add(y, x, alpha=self.alpha_res)
        if self.num_heads:
            y = F.conv2d(reference.mp_attention(F.conv2d(x, self.qkv), self.num_heads), self.proj)
            x = torch.add(y, x, alpha=self.alpha_attn)
        if self.clip is not None:
            x = x.clamp_(-self.clip, self.clip)
        return x


class FastPrecond(torch.nn.Module):
    """A snapshot of a :class:`~autoguide_fast.networks.edm2.Precond` for inference in float32:
    ``D(x, sigma, labels=None)`` with x [N, C, H, W], sigma 0-d or [N], labels None or
    [N, label_dim]; returns D(x; sigma) [N, C, H, W] float32. Inputs other than float32 CPU
    tensors go to the original network. It carries the network's ``img_channels``,
    ``img_resolution``, ``label_dim`` and ``config``. Build it with :func:`optimize`.

    ``dtype=torch.bfloat16`` (opt-in) runs the U-Net's convolutions and products in bfloat16
    (``torch.autocast``; the preconditioning and the output stay float32): on CPUs with bfloat16
    matrix units (AMX, AVX512-BF16) 1.5-2.1x faster than float32 at batch 64 and slower at batch 1,
    with samples ~1% off float32's (relative L2 over a sampler run; measured with random weights
    by ``benchmarks/test_bench_edm2.py``, which prints both)."""

    def __init__(self, net: Precond, compile: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(net, Precond):
            raise TypeError(f"net must be an EDM2 Precond, got {type(net).__name__}")
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype!r}")
        self.dtype = dtype
        unet = net.unet
        self.net = net
        self.img_channels, self.img_resolution = net.img_channels, net.img_resolution
        self.label_dim, self.sigma_data, self.config = net.label_dim, net.sigma_data, net.config
        label_alpha, label_beta = _mp_sum_scales(unet.label_balance)
        self.register_buffer("freqs", unet.emb_fourier.freqs.detach().float().clone())
        self.register_buffer("phases", unet.emb_fourier.phases.detach().float().clone())
        # mp_sum of the noise and class embeddings (conditional networks only) as scaled weights.
        noise_scale = label_alpha if unet.emb_label is not None else 1.0
        self.register_buffer("emb_noise", _weight(unet.emb_noise, noise_scale))
        emb_label = _weight(unet.emb_label, label_beta) if unet.emb_label is not None else None
        self.register_buffer("emb_label", emb_label if emb_label is not None else torch.empty(0))
        layers = list(unet.enc.items()) + list(unet.dec.items())
        blocks = [b for _, b in layers if isinstance(b, Block)]
        self.register_buffer("in_conv", _weight(layers[0][1]))
        # Layer names start with the resolution the layer works at ("8x8_block0").
        self.blocks = torch.nn.ModuleList(
            [_FastBlock(b, int(k.split("x")[0])) for k, b in layers if isinstance(b, Block)]
        )
        self.concat = ["block" in k for k in unet.dec]  # decoder blocks that take a skip
        self.concat_balance = unet.concat_balance
        # mp_silu's 1 / 0.596 on the embedding goes into every block's embedding layer.
        self.register_buffer(
            "emb_linear", torch.cat([_weight(b.emb_linear, 1 / _SILU_STD, gain=b.emb_gain) for b in blocks])
        )
        self.widths = [b.out_channels for b in blocks]
        self.register_buffer("out_conv", _weight(unet.out_conv, gain=unet.out_gain))
        self.macs = float(
            sum(b.macs for b in self.blocks)
            + (self.in_conv.numel() + self.out_conv.numel()) * net.img_resolution**2
        )
        self._compiled = None
        self._compiled_for: set = set()  # input shapes already compiled (no config patch needed)
        if compile:
            self.compile_()

    def compile_(self) -> FastPrecond:
        """Calls go to a ``torch.compile``-d forward from now on (compiled at the first call of
        each batch size; a compiler failure warns once and the eager path serves)."""
        if self.dtype != torch.float32:
            raise ValueError("compile applies to the float32 path only (dtype=torch.float32)")
        if self._compiled is None:
            self._compiled = torch.compile(self._forward, dynamic=False)
        return self

    @property
    def compiled(self) -> bool:
        """Whether calls go to the compiled forward (False after a compiler failure)."""
        return self._compiled is not None

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        # Preconditioning (EDM, Table 1) and the U-Net of edm2.Precond / edm2.UNet.
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4

        # Embedding; every block's modulation emb_linear(mp_silu(emb)) + 1 in one product.
        emb = ((c_noise.ger(self.freqs) + self.phases).cos() * math.sqrt(2)) @ self.emb_noise.t()
        if labels is not None:
            emb = emb + (labels * math.sqrt(labels.shape[1])) @ self.emb_label.t()
        mods = (F.silu(emb) @ self.emb_linear.t() + 1)[:, :, None, None].split(self.widths, dim=1)

        h = c_in * x
        h = torch.cat([h, torch.ones_like(h[:, :1])], dim=1).contiguous(memory_format=torch.channels_last)
        h = F.conv2d(h, self.in_conv, padding=1)
        skips = [h]
        n_enc = len(self.blocks) - len(self.concat)
        for block, c in zip(self.blocks[:n_enc], mods[:n_enc]):
            h = block(h, c)
            skips.append(h)
        for block, c, concat in zip(self.blocks[n_enc:], mods[n_enc:], self.concat):
            if concat:  # mp_cat (Eq. 103)
                s, t = skips.pop(), self.concat_balance
                k = math.sqrt((h.shape[1] + s.shape[1]) / ((1 - t) ** 2 + t**2))
                wa, wb = k / math.sqrt(h.shape[1]) * (1 - t), k / math.sqrt(s.shape[1]) * t
                h = torch.cat([h if wa == 1 else wa * h, s if wb == 1 else wb * s], dim=1)
            h = block(h, c)
        f = F.conv2d(h, self.out_conv, padding=1)
        return (c_skip * x + c_out * f).contiguous()

    def forward(self, x: torch.Tensor, sigma, labels: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
            return self.net(x, sigma, labels)
        check_input(self.net, x)
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(n, 1, 1, 1)
        if self.label_dim == 0:
            labels = None
        elif labels is None:
            labels = torch.zeros([n, self.label_dim])
        else:
            labels = labels.to(torch.float32).reshape(-1, self.label_dim).expand(n, -1)
        with torch.no_grad():
            if self._compiled is not None:
                try:
                    key = (tuple(x.shape), labels is None)
                    if key in self._compiled_for:
                        return self._compiled(x, sigma, labels)
                    # Compilation happens inside calls (the first, and each new batch size):
                    # freezing (weights as constants, prepacked for oneDNN) is set for those
                    # calls only, not for the process (patching costs ~0.4 ms, so only then).
                    with torch._inductor.config.patch(freezing=True):
                        out = self._compiled(x, sigma, labels)
                    self._compiled_for.add(key)
                    return out
                except Exception as e:  # no C++ compiler, or a compiler bug: eager is exact too
                    warn_compile_failure("the EDM2 network", e, stacklevel=2)
                    self._compiled = None
            if self.dtype == torch.bfloat16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return self._forward(x, sigma, labels).float()
            return self._forward(x, sigma, labels)


def optimize(net: Precond, *, compile: bool = False, dtype: torch.dtype = torch.float32) -> FastPrecond:
    """The inference path of ``net`` (see the module docstring): a denoiser with ``net``'s call
    signature and attributes, its weights a snapshot of ``net``'s now. ``compile``: also compile
    it with ``torch.compile`` (worth it for long runs: compiling takes tens of seconds per batch
    size on small machines). ``dtype``: ``torch.bfloat16`` for the opt-in bfloat16 arithmetic
    (see :class:`FastPrecond`)."""
    return FastPrecond(net, compile=compile, dtype=dtype)


def mode() -> str:
    """The requested EDM2 inference path: ``AUTOGUIDE_EDM2`` (auto, fast, compile, plain or bf16)."""
    value = os.environ.get("AUTOGUIDE_EDM2", "auto").strip().lower()
    if value not in _MODES:
        raise ValueError(f"AUTOGUIDE_EDM2 must be one of {', '.join(_MODES)}, got {value!r}")
    return value


# Under AUTOGUIDE_EDM2=auto a run is compiled when its work is at least this many multiply-adds:
# about 30 min of plain evaluation on a 2-core CPU (~40 GMAC/s). Compiling costs up to ~2 min
# per network and batch size there (cold cache; a run meets two sizes, the last batch being
# partial) and saves a third or more of the time (1.6-2.2x measured, benchmarks/test_bench_edm2.py),
# so it pays back well before that.
COMPILE_WORTH_MACS = 7.2e13


def for_sampling(model, example: torch.Tensor, evaluations: float = 0.0):
    """``model`` as sampling should call it: a :class:`FastPrecond` for an EDM2 ``Precond`` in
    eval mode when ``example`` (the sampler's state [N, ...]) is a float32 CPU tensor and
    ``AUTOGUIDE_EDM2`` allows it; in bfloat16 under ``bf16``; compiled under ``compile``, and
    under ``auto`` when ``evaluations`` (samples x calls per sample the run will make) times the
    network's multiply-adds per sample reach :data:`COMPILE_WORTH_MACS`. Anything else is
    returned as it is."""
    m = mode()
    if (
        m == "plain"
        or not isinstance(model, Precond)
        or model.training
        or example.dtype != torch.float32
        or example.device.type != "cpu"
        or any(p.device.type != "cpu" for p in model.parameters())
    ):
        return model
    fast = FastPrecond(model, compile=m == "compile", dtype=torch.bfloat16 if m == "bf16" else torch.float32)
    if m == "auto" and evaluations * fast.macs >= COMPILE_WORTH_MACS:
        fast.compile_()
    return fast


def accelerate(net, guidance, example: torch.Tensor, evaluations: float = 0.0):
    """``(net, guidance)`` with every EDM2 network in them passed through :func:`for_sampling`
    (the guidance copied, the caller's left as it was); ``evaluations`` as there (an upper bound
    for the guides, which are evaluated only where the guidance interval says)."""
    net = for_sampling(net, example, evaluations)
    if guidance is not None:
        guidance = copy.copy(guidance)
        guidance.guide = for_sampling(guidance.guide, example, evaluations)
        if getattr(guidance, "uncond", None) is not None:
            guidance.uncond = for_sampling(guidance.uncond, example, evaluations)
    return net, guidance
