"""GPU benchmarks of the fused kernels (skipped without CUDA + CuPy); ratios in one process,
timed with CUDA events after warm-up. The card is recorded in extra_info."""

import pytest
import torch

from autoguide_fast.kernels import reference

pytestmark = pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")


def _cuda_time(fn, iters=50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def _need_cupy():
    from autoguide_fast.kernels import cuda

    if not cuda.available():
        pytest.skip("CuPy not installed")
    return cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_guided_step(benchmark, dtype):
    cuda = _need_cupy()
    shape = (64, 4, 64, 64)
    x, m, g, m2 = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(4))

    def fused():
        xn, d = cuda.guided_euler(x, m, g, 2.0, 1.5, 1.2)
        return cuda.guided_heun(x, xn, d, m2, g, 2.0, 1.5, 1.2)

    def eager():
        xn, d = reference.guided_euler(x, m, g, 2.0, 1.5, 1.2)
        return reference.guided_heun(x, xn, d, m2, g, 2.0, 1.5, 1.2)

    t_fused, t_eager = _cuda_time(fused), _cuda_time(eager)
    dst = torch.empty_like(x)
    t_copy = _cuda_time(lambda: dst.copy_(x))
    # Bytes the fused pair must move: euler reads 3 and writes 1 tensor + a float32 slope;
    # heun reads 4 tensors + the slope and writes 1.
    e = x.element_size() * x.numel()
    moved = 4 * e + 4 * x.numel() + 5 * e + 4 * x.numel()
    copy_bw = 2 * e / t_copy
    info = dict(
        device=torch.cuda.get_device_name(), speedup=t_eager / t_fused, fused_gb_s=moved / t_fused / 1e9,
        copy_gb_s=copy_bw / 1e9, bandwidth_fraction=moved / t_fused / copy_bw,
    )  # fmt: skip
    benchmark.extra_info.update(info)
    print(f"\n{dtype}: {info}")
    benchmark.pedantic(fused, rounds=20, iterations=5)


@pytest.mark.parametrize("batch, res, heads", [(32, 16, 9), (32, 16, 6), (32, 8, 12), (32, 8, 8)])
def test_attention(benchmark, batch, res, heads):
    """Both fused kernels (tensor cores, the default for float16; float32 arithmetic) against the
    best torch path (normalise + transpose + scaled_dot_product_attention + transpose back)."""
    cuda = _need_cupy()
    qkv = torch.randn(batch, 3 * heads * 64, res, res, device="cuda", dtype=torch.float16)
    tc = cuda.tensor_cores_for(qkv)
    t_fused = _cuda_time(lambda: cuda.mp_attention(qkv, heads, tensor_cores=tc))
    t_simt = _cuda_time(lambda: cuda.mp_attention(qkv, heads, tensor_cores=False))
    t_torch = _cuda_time(lambda: reference.mp_attention(qkv, heads))
    ref = reference.mp_attention(qkv, heads).float()

    def diff(tensor_cores):
        return float((cuda.mp_attention(qkv, heads, tensor_cores=tensor_cores).float() - ref).abs().max())

    info = dict(
        device=torch.cuda.get_device_name(), tensor_cores=tc, speedup=t_torch / t_fused,
        max_abs_diff=diff(tc), simt_speedup=t_torch / t_simt, simt_max_abs_diff=diff(False),
        fused_ms=t_fused * 1e3, torch_ms=t_torch * 1e3,
    )  # fmt: skip
    benchmark.extra_info.update(info)
    print(f"\n{batch}x{res}x{res} heads {heads}: {info}")
    benchmark.pedantic(lambda: cuda.mp_attention(qkv, heads), rounds=20, iterations=5)


def test_end_to_end_sampling(benchmark, monkeypatch):
    _need_cupy()
    import autoguide_fast as ag
    from autoguide_fast.networks import PRESETS, Precond

    main = Precond(**PRESETS["edm2-img512-s"]).cuda().eval().requires_grad_(False)
    guide = Precond(**PRESETS["edm2-img512-xs"]).cuda().eval().requires_grad_(False)
    noise = torch.randn(32, 4, 64, 64, device="cuda")
    labels = torch.eye(1000, device="cuda")[:32]

    def run():
        ag.sample(main, noise, labels, guidance=ag.Autoguidance(guide, 2.0), steps=32)

    monkeypatch.setenv("AUTOGUIDE_KERNELS", "cuda")
    t_on = _cuda_time(run, iters=2)
    monkeypatch.setenv("AUTOGUIDE_KERNELS", "reference")
    t_off = _cuda_time(run, iters=2)
    info = dict(
        device=torch.cuda.get_device_name(), kernels_on_s=t_on, kernels_off_s=t_off, ratio=t_off / t_on
    )
    benchmark.extra_info.update(info)
    print(f"\nend to end: {info}")
    monkeypatch.setenv("AUTOGUIDE_KERNELS", "cuda")
    benchmark.pedantic(run, rounds=1, iterations=1)
