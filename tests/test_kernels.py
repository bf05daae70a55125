"""Fused kernels: NVRTC compilation (no GPU needed), the torch references against float64,
dispatch, fake implementations, and, on a CUDA machine, the kernels against float64 references
(skipped cleanly elsewhere; nothing queries the GPU at import time)."""

import math

import pytest
import torch

from autoguide_fast import kernels
from autoguide_fast.kernels import reference


@pytest.fixture
def cuda():
    """The CUDA kernel layer; skips without a CUDA device or CuPy (no GPU query at import time)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from autoguide_fast.kernels import cuda as layer

    if not layer.available():
        pytest.skip("CuPy not installed")
    return layer


@pytest.mark.parametrize("name", ["guided_step.cu", "mp_attention.cu", "mp_attention_tc.cu"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_compile_with_nvrtc(name, arch):
    from autoguide_fast.kernels.__main__ import compile_source

    ok, log, cubin = compile_source(name, arch)
    assert ok, log
    assert cubin > 10_000


def step_inputs(n, dtype, device="cpu", seed=0, guide=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    m = torch.randn(n, generator=g)
    d = torch.randn(n, generator=g) if guide else None
    return [t if t is None else t.to(device, dtype) for t in (x, m, d)]


def euler64(x, m, d, w, t_hat, t_next):
    x, m = x.double(), m.double()
    D = m if d is None else d.double() + w * (m - d.double())
    dd = (x - D) / t_hat
    return x + (t_next - t_hat) * dd, dd


@pytest.mark.parametrize("guide", [True, False])
def test_reference_step_matches_float64(guide):
    x, m, d = step_inputs(1001, torch.float32, guide=guide)
    xn, dc = reference.guided_euler(x, m, d, 2.5, 3.0, 2.0)
    want_xn, want_d = euler64(x, m, d, 2.5, 3.0, 2.0)
    torch.testing.assert_close(xn.double(), want_xn, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dc.double(), want_d, rtol=1e-6, atol=1e-6)
    m2 = torch.randn(1001)
    out = reference.guided_heun(x, xn, dc, m2, None if d is None else d * 0.5, 2.5, 3.0, 2.0)
    D2 = m2.double() if d is None else (0.5 * d.double()) + 2.5 * (m2.double() - 0.5 * d.double())
    want = x.double() + (2.0 - 3.0) * (0.5 * dc.double() + 0.5 * (xn.double() - D2) / 2.0)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-5)


def test_dispatch_mode(monkeypatch):
    x, m, d = step_inputs(10, torch.float32)
    qkv = torch.randn(1, 6, 2, 3)
    for mode in ("reference", "auto", "cuda"):  # CPU tensors always take the reference
        monkeypatch.setenv("AUTOGUIDE_KERNELS", mode)
        assert kernels.mode() == mode
        got = kernels.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0]
        torch.testing.assert_close(got, reference.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0], rtol=0, atol=0)
        torch.testing.assert_close(
            kernels.mp_attention(qkv, 1), reference.mp_attention(qkv, 1), rtol=0, atol=0
        )
    monkeypatch.setenv("AUTOGUIDE_KERNELS", "fast")
    with pytest.raises(ValueError, match="AUTOGUIDE_KERNELS must be"):
        kernels.guided_euler(x, m, d, 2.0, 1.0, 0.5)


def test_fused_step_only_takes_what_the_kernels_handle():
    x = torch.zeros(6)
    assert kernels._fusable(x, x, None)
    assert not kernels._fusable(x.double(), x.double(), None)  # float64 sampling: reference
    assert not kernels._fusable(x, x.half(), None)  # mixed dtypes
    assert not kernels._fusable(x, torch.zeros(6, device="meta"), None)  # mixed devices
    assert not kernels._fusable(x, torch.zeros(12)[::2], None)  # strided view
    assert not kernels._fusable(x, torch.zeros(2, 3), None)  # other shape


def test_ptx_of_the_guided_step_uses_16_byte_accesses():
    from autoguide_fast.kernels.__main__ import check_ptx, ptx_entries

    entries = ptx_entries("guided_step.cu")
    assert {f"guided_{k}_{t}" for k in ("euler", "heun") for t in ("f32", "f16", "bf16")} <= set(entries)
    assert check_ptx("guided_step.cu") == []


def test_ptx_of_the_tensor_core_attention_uses_mma():
    from autoguide_fast.kernels.__main__ import check_ptx, ptx_entries

    entries = ptx_entries("mp_attention_tc.cu")
    assert {f"mp_attention_tc_{t}_d{d}" for t in ("f16", "bf16") for d in (32, 64, 128)} == set(entries)
    assert check_ptx("mp_attention_tc.cu") == []


def test_fake_implementations_give_shapes_for_compile():
    from autoguide_fast.kernels import cuda

    x = torch.empty(2, 4, 8, 8, device="meta", dtype=torch.float16)
    xn, d = cuda._guided_euler_op(x, x, None, 2.0, 1.0, 0.5)
    assert xn.shape == x.shape and xn.dtype == torch.float16 and d.dtype == torch.float32
    assert cuda._guided_heun_op(x, x, d, x, x, 2.0, 1.0, 0.5).shape == x.shape
    for tensor_cores in (False, True):
        y = cuda._mp_attention_op(torch.empty(2, 3 * 64, 8, 8, device="meta"), 2, tensor_cores)
        assert y.shape == (2, 64, 8, 8)


def test_cuda_layer_validates_inputs():
    from autoguide_fast.kernels import cuda

    x = torch.zeros(4)
    with pytest.raises(ValueError, match="x_hat must be a CUDA tensor"):
        cuda.guided_euler(x, x, None, 2.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="not supported by the CUDA kernel"):
        cuda.mp_attention(torch.zeros(1, 9, 2, 2), 3)


# ---------------------------------------------------------------------------------------------
# GPU: kernels against float64 references, pass when the kernel's error is at most 2x that of
# the torch reference at the same precision; outputs are poisoned first; NaN never passes.


def _poison(*outputs):
    """Leaves NaN-filled blocks in the caching allocator exactly where the kernel's outputs
    (given as (shape, dtype)) will be allocated next, so that an element the kernel fails to
    write cannot look right (a float32 NaN block would read as zeros in half precision, and a
    large block would not be reused for small outputs)."""
    junk = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in outputs]
    del junk


def _err(a, b):
    return float((a.double() - b).abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099, 64 * 4 * 64 * 64 + 3])
@pytest.mark.parametrize("guide", [True, False])
def test_gpu_guided_step(cuda, dtype, n, guide):
    x, m, d = step_inputs(n, dtype, "cuda", guide=guide)
    want_xn, want_d = euler64(x, m, d, 2.5, 3.0, 2.0)
    _poison((x.shape, dtype), (x.shape, torch.float32))
    xn, dc = cuda.guided_euler(x, m, d, 2.5, 3.0, 2.0)
    ref_xn, _ = reference.guided_euler(x, m, d, 2.5, 3.0, 2.0)
    assert not torch.isnan(xn).any() and not torch.isnan(dc).any()
    assert _err(xn, want_xn) <= 2 * _err(ref_xn, want_xn) + 1e-6
    # Unaligned views (offset by one element) take the scalar path.
    if n > 8:
        xs, ms, ds = x[1:], m[1:], None if d is None else d[1:]
        want_s = euler64(xs, ms, ds, 2.5, 3.0, 2.0)[0]
        got = cuda.guided_euler(xs, ms, ds, 2.5, 3.0, 2.0)[0]
        assert (
            _err(got, want_s) <= 2 * _err(reference.guided_euler(xs, ms, ds, 2.5, 3.0, 2.0)[0], want_s) + 1e-6
        )
    m2 = torch.randn_like(m)
    _poison((x.shape, dtype))
    out = cuda.guided_heun(x, xn, dc, m2, d, 2.5, 3.0, 2.0)
    ref_out = reference.guided_heun(x, xn, dc, m2, d, 2.5, 3.0, 2.0)
    D2 = m2.double() if d is None else d.double() + 2.5 * (m2.double() - d.double())
    want = x.double() + (2.0 - 3.0) * (0.5 * dc.double() + 0.5 * (xn.double() - D2) / 2.0)
    assert not torch.isnan(out).any()
    assert _err(out, want) <= 2 * _err(ref_out, want) + 1e-6


def attention64(qkv, heads):
    n, c3, h, w = qkv.shape
    y = qkv.double().reshape(n, heads, -1, 3, h * w)
    d = y.shape[2]
    y = y / (1e-4 + y.norm(dim=2, keepdim=True) / math.sqrt(d))
    q, k, v = y.unbind(3)
    a = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(d)).softmax(dim=3)
    return torch.einsum("nhqk,nhck->nhcq", a, v).reshape(n, c3 // 3, h, w)


ATTENTION_SHAPES = [(2, 64, (8, 8)), (3, 32, (7, 9)), (5, 64, (16, 16)), (1, 128, (1, 63)), (4, 64, (1, 257)),
                    (2, 32, (32, 32)), (3, 128, (10, 13))]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, tensor_cores",
    [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.float16, True),
     (torch.bfloat16, True)],
)  # fmt: skip
@pytest.mark.parametrize("heads, d, hw", ATTENTION_SHAPES)
def test_gpu_attention(cuda, dtype, tensor_cores, heads, d, hw):
    if tensor_cores and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tensor-core kernel needs sm_80+")
    qkv = torch.randn(2, 3 * heads * d, *hw, device="cuda").to(dtype)
    want = attention64(qkv, heads)
    _poison(((2, heads * d, *hw), dtype))
    got = cuda.mp_attention(qkv, heads, tensor_cores=tensor_cores)
    ref = reference.mp_attention(qkv, heads)
    assert not torch.isnan(got).any()
    assert _err(got, want) <= 2 * _err(ref, want) + 1e-6


@pytest.mark.gpu
def test_gpu_dispatch_falls_back_where_the_kernels_do_not_apply(cuda):
    # float64 sampling state: the reference, no error.
    x, m, d = step_inputs(100, torch.float64, "cuda")
    torch.testing.assert_close(
        kernels.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0], reference.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0]
    )
    # Attention under autograd (training): gradients flow, through the reference.
    qkv = torch.randn(2, 3 * 64, 8, 8, device="cuda", requires_grad=True)
    kernels.mp_attention(qkv, 1).square().sum().backward()
    want = torch.autograd.grad(reference.mp_attention(qkv, 1).square().sum(), qkv)[0]
    torch.testing.assert_close(qkv.grad, want)
    # Empty batch: an empty result, not an invalid launch.
    assert cuda.mp_attention(torch.randn(0, 3 * 64, 8, 8, device="cuda"), 1).shape == (0, 64, 8, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("use_fp16", [False, True])
def test_gpu_autoguided_sampling_with_kernels_matches_the_reference(cuda, monkeypatch, use_fp16):
    """End to end: an EDM2 main and guide with attention, sampled with the fused kernels on and off
    from the same noise (float32 U-Net: close to float32 rounding; float16: the tensor-core path)."""
    import autoguide_fast as ag
    from autoguide_fast.networks import PRESETS, Precond

    torch.manual_seed(0)
    main = Precond(**(PRESETS["img32-xs"] | dict(use_fp16=use_fp16))).cuda().eval().requires_grad_(False)
    guide = Precond(**(PRESETS["img32-xs"] | dict(use_fp16=use_fp16))).cuda().eval().requires_grad_(False)
    noise = torch.randn(4, 3, 32, 32, device="cuda")
    labels = torch.eye(10, device="cuda")[:4]

    def run(mode):
        monkeypatch.setenv("AUTOGUIDE_KERNELS", mode)
        return ag.sample(main, noise, labels, guidance=ag.Autoguidance(guide, 2.0), steps=8)

    fused, plain = run("cuda"), run("reference")
    assert torch.isfinite(fused).all()
    scale = float(plain.abs().max())
    # float16: the two attention paths round differently at every layer and step; a wrong index
    # or a missing element would differ at the scale of the images themselves.
    assert float((fused - plain).abs().max()) <= (2e-2 if use_fp16 else 1e-4) * scale


@pytest.mark.gpu
def test_gpu_ops_compile_and_capture_in_cuda_graphs(cuda):
    """The custom ops trace under torch.compile (fake implementations) and replay in a CUDA graph."""
    x, m, d = step_inputs(4099, torch.float16, "cuda")
    qkv = torch.randn(2, 3 * 64, 8, 8, device="cuda", dtype=torch.float16)

    def step(x, m, d, qkv):
        xn, slope = torch.ops.autoguide_fast.guided_euler(x, m, d, 2.5, 3.0, 2.0)
        return xn, slope, torch.ops.autoguide_fast.mp_attention(qkv, 1, True)

    want = step(x, m, d, qkv)
    got = torch.compile(step, fullgraph=True)(x, m, d, qkv)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    static = [t.clone() for t in (x, m, d, qkv)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(*static)  # warm-up off the capture: compiles and loads the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*static)
    for t, src in zip(static, (x * 0.5, m, d, qkv * 2)):
        t.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, step(*static)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
