"""GPU benchmarks of the fused kernels (skipped without CUDA + CuPy). Each ``*_numbers`` function
measures one thing and returns a dict of plain numbers; the tests below report them through
pytest-benchmark (``make bench``) and ``scripts/gpu_check/`` calls the same functions directly
(``make gpu-check``, docs/gpu-check.md), so the GPU check needs no pytest-benchmark.

Every speed is a ratio within one run: kernel bandwidth against a device-to-device copy of the same
size, the fused paths against torch's on the same inputs, kernels on against off. GPU times come
from CUDA events, eagerly and under CUDA-graph replay (``conftest.cuda_time``); the difference is
the host's per-call cost, measured on its own too (``conftest.host_time``)."""

import os
import statistics
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from autoguide_fast.kernels import reference
from conftest import cuda_time, host_time

pytestmark = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")

# Elements of the bandwidth run: every kernel call moves at least 1.6 GB, far past the L2 cache
# (60 MB on an H200), so the numbers are DRAM bandwidth, not cache bandwidth.
STEP_N = 1 << 27
# One EDM2 latent batch of 64 (64 x 4 x 64 x 64): the size a sampler step really has, where the
# host's per-call cost decides.
STEP_N_SMALL = 64 * 4 * 64 * 64
W, T_HAT, T_NEXT = 2.0, 1.5, 1.2
BANDWIDTH_GOAL = 0.7  # fraction of the copy bandwidth the fused step is meant to reach
# EDM2 attention layers at batch 32 (head dim 64): S has 9 heads at 16x16 and 12 at 8x8, XS 6 and 8.
ATTENTION_SHAPES = [(32, 16, 9), (32, 8, 12), (32, 16, 6), (32, 8, 8)]


def layer():
    """The CUDA kernel layer (``autoguide_fast.kernels.cuda``); skips without CuPy."""
    from autoguide_fast.kernels import cuda

    if not cuda.available():
        pytest.skip("CuPy not installed")
    return cuda


def replay_time(fn, info: dict, **kwargs) -> float:
    """``cuda_time(fn, graph=True)``; where the capture fails, the eager time, with the failure noted
    in ``info["graph_failed"]`` (one failed capture must not cost a case its other numbers)."""
    try:
        return cuda_time(fn, graph=True, **kwargs)
    except RuntimeError as e:
        info.setdefault("graph_failed", f"{type(e).__name__}: {e}"[:300])
        torch.cuda.synchronize()
        return cuda_time(fn, **kwargs)


def step_bytes(n: int, dtype: torch.dtype, guide: bool = True) -> dict[str, int]:
    """Fewest bytes each kernel must move: Euler reads x, D_main (and D_guide) and writes x_next and
    the float32 slope; Heun reads x, x_next, the slope, D_main (and D_guide) and writes x_out."""
    e, slope = n * torch.empty((), dtype=dtype).element_size(), 4 * n
    return dict(euler=(3 + guide) * e + slope, heun=(4 + guide) * e + slope, copy=2 * e)


def guided_step_numbers(cuda, dtype: torch.dtype, n: int = STEP_N) -> dict:
    """Bandwidth of the fused Euler and Heun kernels against a copy of the same size (graph replay,
    so launch gaps do not count), eager times, the fused pair against torch's, and the largest
    difference from torch's result relative to its largest value."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x, m, gd, m2 = (torch.randn(n, device="cuda", generator=g).to(dtype) for _ in range(4))
    xn, d = cuda.guided_euler(x, m, gd, W, T_HAT, T_NEXT)
    out = cuda.guided_heun(x, xn, d, m2, gd, W, T_HAT, T_NEXT)
    ref_xn, ref_d = reference.guided_euler(x, m, gd, W, T_HAT, T_NEXT)
    ref_out = reference.guided_heun(x, ref_xn, ref_d, m2, gd, W, T_HAT, T_NEXT)
    diff = max(
        float((a.float() - b.float()).abs().max() / b.float().abs().max())
        for a, b in ((xn, ref_xn), (out, ref_out))
    )
    del ref_xn, ref_d, ref_out
    dst = torch.empty_like(x)

    def euler():
        cuda.guided_euler(x, m, gd, W, T_HAT, T_NEXT)

    def heun():
        cuda.guided_heun(x, xn, d, m2, gd, W, T_HAT, T_NEXT)

    def torch_pair():
        xr, dr = reference.guided_euler(x, m, gd, W, T_HAT, T_NEXT)
        reference.guided_heun(x, xr, dr, m2, gd, W, T_HAT, T_NEXT)

    info = dict(dtype=str(dtype).removeprefix("torch."), n=n)
    t = {
        "copy": replay_time(lambda: dst.copy_(x), info),
        "euler": replay_time(euler, info),
        "heun": replay_time(heun, info),
        "euler_eager": cuda_time(euler),
        "heun_eager": cuda_time(heun),
        "torch_pair": cuda_time(torch_pair, reps=3),
    }
    moved = step_bytes(n, dtype)
    bandwidth = {k: moved[k] / t[k] for k in ("copy", "euler", "heun")}
    info["copy_gb_s"] = bandwidth["copy"] / 1e9
    for k in ("euler", "heun"):
        info[f"{k}_gb"] = moved[k] / 1e9
        info[f"{k}_gb_s"] = bandwidth[k] / 1e9
        info[f"{k}_of_copy"] = bandwidth[k] / bandwidth["copy"]
        info[f"{k}_us"] = t[k] * 1e6
        info[f"{k}_eager_us"] = t[f"{k}_eager"] * 1e6
    info["torch_pair_us"] = t["torch_pair"] * 1e6
    info["speedup_vs_torch"] = t["torch_pair"] / (t["euler_eager"] + t["heun_eager"])
    info["max_rel_diff_vs_torch"] = diff
    info["goal_of_copy"] = BANDWIDTH_GOAL
    info["goal_met"] = min(info["euler_of_copy"], info["heun_of_copy"]) >= BANDWIDTH_GOAL
    return info


def guided_step_overhead_numbers(cuda, dtype: torch.dtype, n: int = STEP_N_SMALL) -> dict:
    """At a sampler's real size: the Euler kernel's GPU time (graph replay), its eager time per call,
    and the host's cost per call through the public function (validation + custom op + CuPy
    launch), the custom op alone, and the bare CuPy launch; torch's step pair for comparison."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x, m, gd = (torch.randn(n, device="cuda", generator=g).to(dtype) for _ in range(3))
    xn, d = torch.empty_like(x), torch.empty(n, device="cuda")
    suffix = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    grid, block = cuda._grid(n, 16 // x.element_size())
    pointers = tuple(cuda._ptr(t) for t in (x, m, gd, xn, d))
    scalars = (np.int64(n), np.float32(W), np.float32(T_HAT), np.float32(T_NEXT - T_HAT))
    args = (*pointers, *scalars, cuda._aligned(x, m, gd, xn, d))

    def public():
        cuda.guided_euler(x, m, gd, W, T_HAT, T_NEXT)

    def op():
        torch.ops.autoguide_fast.guided_euler(x, m, gd, W, T_HAT, T_NEXT)

    def launch():
        cuda._launch("guided_step.cu", f"guided_euler_{suffix}", x.device, grid, block, args)

    def torch_pair():
        xr, dr = reference.guided_euler(x, m, gd, W, T_HAT, T_NEXT)
        reference.guided_heun(x, xr, dr, m, gd, W, T_HAT, T_NEXT)

    info = dict(dtype=str(dtype).removeprefix("torch."), n=n)
    us = dict(
        euler_graph=replay_time(public, info),
        euler_eager=cuda_time(public),
        host_public=host_time(public),
        host_op=host_time(op),
        host_launch=host_time(launch),
        torch_pair_eager=cuda_time(torch_pair),
        torch_pair_graph=replay_time(torch_pair, info),
    )
    return info | {f"{k}_us": v * 1e6 for k, v in us.items()}


def torch_best_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """torch's fastest eager path: the reference's normalisation, then q, k, v made contiguous
    [N, heads, L, D] so that scaled_dot_product_attention can take its flash kernel."""
    from autoguide_fast.networks.mp import normalize

    n, c3, h, w = qkv.shape
    qkv = normalize(qkv.reshape(n, heads, -1, 3, h * w), dim=2)
    q, k, v = (t.transpose(-1, -2).contiguous() for t in qkv.unbind(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(n, c3 // 3, h, w)


def _flash_eligible(qkv: torch.Tensor, heads: int) -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch_best_attention(qkv, heads)
        return True
    except RuntimeError:
        return False


def attention_numbers(cuda, batch: int, res: int, heads: int, dtype: torch.dtype = torch.float16) -> dict:
    """The fused attention kernels (tensor cores where they apply; float32 arithmetic) against the
    package's torch reference and torch's best path, each timed eagerly and under graph replay,
    each with its error against float64 (relative L2 norm and largest absolute difference)."""
    g = torch.Generator(device="cuda").manual_seed(2)
    qkv = torch.randn(batch, 3 * heads * 64, res, res, device="cuda", generator=g).to(dtype)
    tc = cuda.tensor_cores_for(qkv)
    want = reference.mp_attention_float64(qkv, heads)
    paths = {
        "fused": lambda: cuda.mp_attention(qkv, heads, tensor_cores=tc),
        "simt": lambda: cuda.mp_attention(qkv, heads, tensor_cores=False),
        "torch_ref": lambda: reference.mp_attention(qkv, heads),
        "torch_best": lambda: torch_best_attention(qkv, heads),
    }
    info = dict(
        batch=batch,
        res=res,
        heads=heads,
        dtype=str(dtype).removeprefix("torch."),
        tensor_cores=tc,
        flash_eligible=_flash_eligible(qkv, heads),
    )
    for name, fn in paths.items():
        err = fn().double() - want
        info[f"{name}_rel_err"] = float(err.norm() / want.norm())
        info[f"{name}_max_err"] = float(err.abs().max())
        info[f"{name}_us"] = replay_time(fn, info) * 1e6
        info[f"{name}_eager_us"] = cuda_time(fn) * 1e6
    info["speedup_vs_torch_best"] = info["torch_best_us"] / info["fused_us"]
    info["speedup_vs_torch_ref"] = info["torch_ref_us"] / info["fused_us"]
    return info


def nonzero_gains(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gives every gain (``out_gain``, ``emb_gain``) a value in [0.5, 1.5]: a fresh EDM2 U-Net has them
    at 0, and its output is then exactly zero whatever attention computes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.copy_(torch.rand((), generator=g) + 0.5)
    return net


@contextmanager
def kernels_mode(mode: str):
    """``AUTOGUIDE_KERNELS=mode`` inside the block, the previous value after it."""
    old = os.environ.get("AUTOGUIDE_KERNELS")
    os.environ["AUTOGUIDE_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["AUTOGUIDE_KERNELS"]
        else:
            os.environ["AUTOGUIDE_KERNELS"] = old


def end_to_end_numbers(batch: int = 32, steps: int = 32, rounds: int = 2, progress=None) -> dict:
    """Autoguided sampling, EDM2-S-shaped main and XS-shaped guide (float16 U-Nets, random weights
    with non-zero gains, so attention reaches the images), kernels on against off from the same
    noise: seconds per batch (median of ``rounds``, interleaved), the ratio, and the largest
    difference between the two batches of images, absolute and relative to their largest value.
    ``progress(text)``, if given, hears of every run as it ends."""
    say = progress or (lambda text: None)
    import autoguide_fast as ag
    from autoguide_fast.networks import PRESETS, Precond

    torch.manual_seed(0)
    main = nonzero_gains(Precond(**PRESETS["edm2-img512-s"]), 1).cuda().eval().requires_grad_(False)
    guide = nonzero_gains(Precond(**PRESETS["edm2-img512-xs"]), 2).cuda().eval().requires_grad_(False)
    g = torch.Generator(device="cuda").manual_seed(3)
    shape = (batch, main.img_channels, main.img_resolution, main.img_resolution)
    noise = torch.randn(shape, device="cuda", generator=g)
    labels = torch.eye(main.label_dim, device="cuda")[torch.arange(batch) % main.label_dim]

    def run(mode: str, n_steps: int) -> torch.Tensor:
        with kernels_mode(mode):
            return ag.sample(main, noise, labels, guidance=ag.Autoguidance(guide, 2.0), steps=n_steps)

    say("networks built")
    for mode in ("cuda", "reference"):  # warm-up: run-time compilation, cuDNN algorithm choice
        run(mode, 2)
    say("warm-up done")
    times: dict[str, list[float]] = {"cuda": [], "reference": []}
    images = {}
    for _ in range(rounds):
        for mode in times:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            images[mode] = run(mode, steps)
            torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t0)
            say(f"AUTOGUIDE_KERNELS={mode}: {times[mode][-1]:.2f} s")
    on, off = statistics.median(times["cuda"]), statistics.median(times["reference"])
    diff = float((images["cuda"] - images["reference"]).abs().max())
    scale = float(images["reference"].abs().max())
    return dict(
        batch=batch,
        steps=steps,
        kernels_on_s=on,
        kernels_off_s=off,
        ratio=off / on,
        max_abs_diff=diff,
        max_rel_diff=diff / scale,
        image_max=scale,
        finite=bool(torch.isfinite(images["cuda"]).all()),
    )


def _report(benchmark, info: dict, label: str) -> None:
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), **info)
    print(f"\n{label}: {info}")


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_guided_step(benchmark, dtype):
    cuda = layer()
    _report(benchmark, guided_step_numbers(cuda, dtype), f"guided step {dtype}")
    x = torch.randn(STEP_N, device="cuda").to(dtype)
    benchmark.pedantic(_synced(lambda: cuda.guided_euler(x, x, x, W, T_HAT, T_NEXT)), rounds=10, iterations=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_guided_step_overhead(benchmark, dtype):
    cuda = layer()
    _report(benchmark, guided_step_overhead_numbers(cuda, dtype), f"guided step overhead {dtype}")
    x = torch.randn(STEP_N_SMALL, device="cuda").to(dtype)
    benchmark.pedantic(_synced(lambda: cuda.guided_euler(x, x, x, W, T_HAT, T_NEXT)), rounds=20, iterations=5)


@pytest.mark.parametrize("batch, res, heads", ATTENTION_SHAPES)
def test_attention(benchmark, batch, res, heads):
    cuda = layer()
    info = attention_numbers(cuda, batch, res, heads)
    _report(benchmark, info, f"attention {batch}x{res}x{res} heads {heads}")
    qkv = torch.randn(batch, 3 * heads * 64, res, res, device="cuda", dtype=torch.float16)
    benchmark.pedantic(_synced(lambda: cuda.mp_attention(qkv, heads)), rounds=20, iterations=5)


def test_end_to_end_sampling(benchmark):
    layer()
    # pytest-benchmark times the whole measurement once; the ratio is in extra_info.
    _report(benchmark, benchmark.pedantic(end_to_end_numbers, rounds=1, iterations=1), "end to end")
