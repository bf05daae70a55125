"""Fused kernels: NVRTC compilation (no GPU needed), the torch references against float64,
dispatch, fake implementations, and, on a CUDA machine, the kernels against float64 references
(skipped cleanly elsewhere; nothing queries the GPU at import time). The GPU tests carry the
``gpu`` mark (``pytest -m gpu`` runs them alone, as ``make gpu-check`` does) and need no reference files."""

import warnings
from contextlib import nullcontext

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


def heun64(x, x_next, d_cur, m, d, w, t_hat, t_next):
    """The Heun correction in float64, from float64 x_next and d_cur (those of :func:`euler64`)."""
    D = m.double() if d is None else d.double() + w * (m.double() - d.double())
    return x.double() + (t_next - t_hat) * (0.5 * d_cur + 0.5 * (x_next - D) / t_next)


@pytest.mark.parametrize("guide", [True, False])
def test_reference_step_matches_float64(guide):
    x, m, d = step_inputs(1001, torch.float32, guide=guide)
    xn, dc = reference.guided_euler(x, m, d, 2.5, 3.0, 2.0)
    want_xn, want_d = euler64(x, m, d, 2.5, 3.0, 2.0)
    torch.testing.assert_close(xn.double(), want_xn, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dc.double(), want_d, rtol=1e-6, atol=1e-6)
    m2, d2 = torch.randn(1001), None if d is None else d * 0.5
    out = reference.guided_heun(x, xn, dc, m2, d2, 2.5, 3.0, 2.0)
    torch.testing.assert_close(
        out.double(), heun64(x, want_xn, want_d, m2, d2, 2.5, 3.0, 2.0), rtol=1e-6, atol=1e-5
    )


def test_dispatch_mode(monkeypatch):
    x, m, d = step_inputs(10, torch.float32)
    qkv = torch.randn(1, 6, 2, 3)
    monkeypatch.setattr(kernels, "_announced", set())
    for mode in ("reference", "auto", "cuda"):  # CPU tensors always take the reference
        monkeypatch.setenv("AUTOGUIDE_KERNELS", mode)
        assert kernels.mode() == mode
        # Forcing the kernels on CPU tensors says once per op that the reference runs instead.
        warns = pytest.warns(UserWarning, match="AUTOGUIDE_KERNELS=cuda") if mode == "cuda" else nullcontext()
        with warns:
            got = kernels.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0]
        torch.testing.assert_close(got, reference.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0], rtol=0, atol=0)
        with pytest.warns(UserWarning, match="attention") if mode == "cuda" else nullcontext():
            y = kernels.mp_attention(qkv, 1)
        torch.testing.assert_close(y, reference.mp_attention(qkv, 1), rtol=0, atol=0)
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


def test_nvrtc_calls_leave_python_objects_alone(tmp_path):
    # NVRTC writes logs and PTX into the buffers it is given. An immutable bytes buffer of size 1
    # (an empty log) was CPython's shared b" ": writing into it made every b" " in the process
    # b"\x00", and torch.save then wrote files torch.load refused.
    from autoguide_fast.kernels.__main__ import compile_source, ptx_entries

    ptx_entries("guided_step.cu")
    compile_source("guided_step.cu", "sm_80")
    assert b" " == bytes([32]) and b" " * 3 == bytes([32, 32, 32])
    torch.save({"bn": torch.nn.BatchNorm2d(32).state_dict()}, tmp_path / "x.pth")
    torch.testing.assert_close(
        torch.load(tmp_path / "x.pth", weights_only=True)["bn"]["weight"], torch.ones(32)
    )


def test_ptx_of_the_tensor_core_attention_uses_mma():
    from autoguide_fast.kernels.__main__ import check_ptx, ptx_entries

    entries = ptx_entries("mp_attention_tc.cu")
    assert {f"mp_attention_tc_{t}_d{d}" for t in ("f16", "bf16") for d in (32, 64, 128)} == set(entries)
    assert check_ptx("mp_attention_tc.cu") == []


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_fake_implementations_give_the_real_ops_shapes_and_strides(layout):
    """The real ops return contiguous tensors whatever their inputs' strides; so must the fakes, or
    graphs compiled with strided inputs would assume other strides than the kernels write."""
    from autoguide_fast.kernels import cuda

    def meta(*shape, dtype=torch.float16):
        t = torch.empty(*shape, device="meta", dtype=dtype)
        if layout == "channels_last":
            return t.to(memory_format=torch.channels_last)
        return t.transpose(2, 3) if layout == "transposed" else t

    def contiguous(t, shape, dtype):
        return t.shape == shape and t.dtype == dtype and t.is_contiguous()

    x = meta(2, 4, 8, 8)
    xn, d = cuda._guided_euler_op(x, x, None, 2.0, 1.0, 0.5)
    assert contiguous(xn, x.shape, torch.float16) and contiguous(d, x.shape, torch.float32)
    assert contiguous(
        cuda._guided_heun_op(x, x, meta(2, 4, 8, 8, dtype=torch.float32), x, x, 2.0, 1.0, 0.5),
        x.shape,
        torch.float16,
    )
    for tensor_cores in (False, True):
        y = cuda._mp_attention_op(meta(2, 3 * 64, 8, 8), 2, tensor_cores)
        assert contiguous(y, (2, 64, 8, 8), torch.float16)


def test_custom_ops_take_cuda_tensors_only():
    """The ops are registered for CUDA alone: a CPU tensor is refused by the dispatcher and never
    reaches a kernel launch with a host pointer."""
    from autoguide_fast.kernels import cuda

    x = torch.zeros(16)
    with pytest.raises(NotImplementedError, match="CPU"):
        cuda._guided_euler_op(x, x, None, 2.0, 1.0, 0.5)
    with pytest.raises(NotImplementedError, match="CPU"):
        cuda._guided_heun_op(x, x, x, x, None, 2.0, 1.0, 0.5)
    with pytest.raises(NotImplementedError, match="CPU"):
        cuda._mp_attention_op(torch.zeros(1, 3 * 64, 2, 2), 1, False)


def test_cupy_extra_follows_the_cuda_major_version(monkeypatch):
    from autoguide_fast.kernels import cuda

    for version, extra in (("12.8", "cuda12"), ("13.0", "cuda13"), ("14.1", "cuda13"), (None, "cuda12")):
        monkeypatch.setattr(torch.version, "cuda", version)
        assert cuda.cupy_extra() == extra


def nonzero_gains(net, seed):
    """Every gain (``out_gain``, ``emb_gain``) set to a value in [0.5, 1.5]: a fresh EDM2 U-Net has
    them at 0, and its output is then exactly zero whatever attention computes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("_gain"):
                p.copy_(torch.rand((), generator=g) + 0.5)
    return net


def test_nonzero_gains_let_attention_reach_the_output(monkeypatch):
    """What the end-to-end GPU test relies on: with the gains set, replacing attention by zeros
    changes the denoiser's output (with a fresh network's zero gains it changes nothing)."""
    from autoguide_fast.networks import PRESETS, Precond, edm2

    torch.manual_seed(0)
    net = Precond(**PRESETS["img32-xs"]).eval().requires_grad_(False)
    x, sigma, labels = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 3.0]), torch.eye(10)[:2]

    def with_and_without_attention():
        with_attention = net(x, sigma, labels)
        with monkeypatch.context() as m:
            m.setattr(edm2, "mp_attention", lambda qkv, heads: torch.zeros_like(qkv[:, : qkv.shape[1] // 3]))
            return with_attention, net(x, sigma, labels)

    a, b = with_and_without_attention()
    assert torch.equal(a, b)
    nonzero_gains(net, 1)
    a, b = with_and_without_attention()
    assert float((a - b).abs().max()) > 1e-2 * float(a.abs().max())


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


def _within(got, want, ref, dtype, scale):
    """The kernel's error against float64 is at most twice the torch reference's at the same
    precision, plus two units of ``dtype``'s epsilon at the operands' scale (where the reference
    happens to round exactly and the kernel by one unit). NaN never passes."""
    return _err(got, want) <= 2 * _err(ref, want) + 2 * torch.finfo(dtype).eps * scale


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099, 64 * 4 * 64 * 64 + 3])
@pytest.mark.parametrize("guide", [True, False])
def test_gpu_guided_step(cuda, dtype, n, guide):
    """Euler then Heun through the kernels against an independent float64 step (x_next, the float32
    slope and the corrected state, none built from the kernels' own outputs), each within twice the
    error of torch's step at the same precision; aligned tensors (16-byte vector path) and views
    offset by one element (scalar path)."""
    w, t_hat, t_next = 2.5, 3.0, 2.0
    x, m, d = step_inputs(n, dtype, "cuda", guide=guide)
    m2 = step_inputs(n, dtype, "cuda", seed=1)[1]
    cases = [(x, m, d, m2)]
    if n > 8:
        cases.append(tuple(None if t is None else t[1:] for t in (x, m, d, m2)))
    for x, m, d, m2 in cases:
        want_xn, want_d = euler64(x, m, d, w, t_hat, t_next)
        want = heun64(x, want_xn, want_d, m2, d, w, t_hat, t_next)
        ref_xn, ref_d = reference.guided_euler(x, m, d, w, t_hat, t_next)
        ref_out = reference.guided_heun(x, ref_xn, ref_d, m2, d, w, t_hat, t_next)
        _poison((x.shape, dtype), (x.shape, torch.float32))
        xn, dc = cuda.guided_euler(x, m, d, w, t_hat, t_next)
        _poison((x.shape, dtype))
        out = cuda.guided_heun(x, xn, dc, m2, d, w, t_hat, t_next)
        assert (xn.dtype, dc.dtype, out.dtype) == (dtype, torch.float32, dtype)
        assert not any(torch.isnan(t).any() for t in (xn, dc, out))
        # Magnitude of the operands (x and the guided D), the scale of one rounding.
        operands = [float(t.abs().max()) for t in (m, m2, d) if t is not None]
        scale = float(x.abs().max()) + (1 + 2 * w) * max(operands)
        assert _within(xn, want_xn, ref_xn, dtype, scale)
        assert _within(dc, want_d, ref_d, torch.float32, scale / t_hat)
        assert _within(out, want, ref_out, dtype, scale)


ATTENTION_SHAPES = [
    (2, 64, (8, 8)),
    (3, 32, (7, 9)),
    (5, 64, (16, 16)),
    (1, 128, (1, 63)),
    (4, 64, (1, 257)),
    (2, 32, (32, 32)),
    (3, 128, (10, 13)),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, tensor_cores",
    [
        (torch.float32, False),
        (torch.float16, False),
        (torch.bfloat16, False),
        (torch.float16, True),
        (torch.bfloat16, True),
    ],
)
@pytest.mark.parametrize("heads, d, hw", ATTENTION_SHAPES)
def test_gpu_attention(cuda, dtype, tensor_cores, heads, d, hw):
    if tensor_cores and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tensor-core kernel needs sm_80+")
    qkv = torch.randn(2, 3 * heads * d, *hw, device="cuda").to(dtype)
    want = reference.mp_attention_float64(qkv, heads)
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
def test_gpu_autoguided_sampling_with_kernels_matches_float64(cuda, monkeypatch, use_fp16):
    """End to end: an EDM2 main and guide with attention and non-zero gains (so that attention
    reaches the images), sampled from the same noise with the fused kernels on and off, each
    against a float64 run of the same networks: the fused run's error is at most twice the torch
    path's (float32 U-Net: the float32 kernels; float16: the tensor-core attention)."""
    import autoguide_fast as ag
    from autoguide_fast.networks import PRESETS, Precond

    torch.manual_seed(0)
    config = PRESETS["img32-xs"] | dict(use_fp16=use_fp16)
    main = nonzero_gains(Precond(**config), 1).cuda().eval().requires_grad_(False)
    guide = nonzero_gains(Precond(**config), 2).cuda().eval().requires_grad_(False)
    noise = torch.randn(4, 3, 32, 32, device="cuda")
    labels = torch.eye(10, device="cuda")[:4]

    def run(mode, dtype=torch.float32):
        monkeypatch.setenv("AUTOGUIDE_KERNELS", mode)
        guidance = ag.Autoguidance(guide, 2.0)
        return ag.sample(main, noise.to(dtype), labels.to(dtype), guidance=guidance, steps=8)

    fused, plain = run("cuda"), run("reference")
    main.use_fp16 = guide.use_fp16 = False  # float64 U-Nets: the reference attention and step
    want = run("reference", torch.float64)
    assert torch.isfinite(fused).all()
    scale = float(want.abs().max())
    # A wrong index or a missing element would err at the scale of the images themselves.
    assert _err(fused, want) <= 2 * _err(plain, want) + (1e-3 if use_fp16 else 1e-6) * scale


@pytest.mark.gpu
def test_gpu_custom_ops_pass_opcheck(cuda):
    """torch.library.opcheck: the schema, the fake implementations against the real ops (shapes,
    dtypes and strides, with strided inputs too) and AOT dispatch."""
    x, m, d = (t.reshape(65, 63).t() for t in step_inputs(65 * 63, torch.float16, "cuda"))  # transposed
    xn, slope = cuda._guided_euler_op(x, m, d, 2.5, 3.0, 2.0)
    qkv = torch.randn(2, 8, 8, 3 * 64, device="cuda", dtype=torch.float16).permute(0, 3, 1, 2)
    for op, args in (
        (cuda._guided_euler_op, (x, m, d, 2.5, 3.0, 2.0)),
        (cuda._guided_euler_op, (x.contiguous(), m.contiguous(), None, 2.5, 3.0, 2.0)),
        (cuda._guided_heun_op, (x, xn, slope, m, d, 2.5, 3.0, 2.0)),
        (cuda._mp_attention_op, (qkv, 1, True)),
        (cuda._mp_attention_op, (qkv.contiguous(), 1, False)),
    ):
        torch.library.opcheck(op, args)


def _ops_step(x, m, d, qkv):
    """Both custom ops, then views that need the contiguous strides the ops produce."""
    xn, slope = torch.ops.autoguide_fast.guided_euler(x, m, d, 2.5, 3.0, 2.0)
    y = torch.ops.autoguide_fast.mp_attention(qkv, 1, True)
    return xn.view(-1), slope, y.view(y.shape[0], -1)


def _ops_inputs(strided: bool):
    x, m, d = step_inputs(65 * 63, torch.float16, "cuda")
    qkv = torch.randn(2, 8, 8, 3 * 64, device="cuda", dtype=torch.float16).permute(0, 3, 1, 2)
    if strided:  # transposed and channels-last views
        return *(t.reshape(65, 63).t() for t in (x, m, d)), qkv
    return x.reshape(65, 63), m.reshape(65, 63), d.reshape(65, 63), qkv.contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("strided", [False, True])
def test_gpu_ops_compile_with_contiguous_and_strided_inputs(cuda, strided):
    """The custom ops trace under torch.compile (fake implementations) and give what eager gives,
    strides included."""
    inputs = _ops_inputs(strided)
    want = _ops_step(*inputs)
    got = torch.compile(_ops_step, fullgraph=True)(*inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.stride() == b.stride()


@pytest.mark.gpu
def test_gpu_ops_capture_in_cuda_graphs(cuda):
    """The custom ops replay in a CUDA graph, reading the static inputs' new contents."""
    static = [t.clone() for t in _ops_inputs(False)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _ops_step(*static)  # warm-up off the capture: compiles and loads the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _ops_step(*static)
    for t, src in zip(static, _ops_inputs(False)):
        t.copy_(src * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(out, _ops_step(*static)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_mode_trusts_a_kernel_only_after_it_proves_itself(monkeypatch):
    # The mechanism on the CPU: the CUDA path is made to apply to CPU tensors and the "kernel" is a
    # deliberately wrong fake. auto: one warning, then the reference for the rest of the process;
    # cuda: the kernel is forced (and its result used).
    from autoguide_fast.kernels import cuda

    calls = []

    def wrong_euler(x_hat, d_main, d_guide, weight, t_hat, t_next):
        calls.append(1)
        x, d = reference.guided_euler(x_hat, d_main, d_guide, weight, t_hat, t_next)
        return x + 1, d

    monkeypatch.setattr(kernels, "_use_cuda", lambda t, what: True)
    monkeypatch.setattr(kernels, "_trusted", {})
    monkeypatch.setattr(cuda, "guided_euler", wrong_euler)
    monkeypatch.setattr(cuda, "guided_heun", reference.guided_heun)
    monkeypatch.setenv("AUTOGUIDE_KERNELS", "auto")
    x, m, d = step_inputs(10, torch.float32)
    want = reference.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0]
    with pytest.warns(UserWarning, match="guided step kernel differs from the reference"):
        got = kernels.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once: no second warning, no second check
        torch.testing.assert_close(kernels.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0], want, rtol=0, atol=0)
    assert len(calls) == 1
    monkeypatch.setenv("AUTOGUIDE_KERNELS", "cuda")
    torch.testing.assert_close(kernels.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0], want + 1, rtol=0, atol=0)
    # A kernel that fails to launch is distrusted the same way.
    monkeypatch.setenv("AUTOGUIDE_KERNELS", "auto")
    monkeypatch.setattr(kernels, "_trusted", {})

    def broken(*args):
        raise RuntimeError("CUDA_ERROR_LAUNCH_FAILED")

    monkeypatch.setattr(cuda, "guided_euler", broken)
    with pytest.warns(UserWarning, match="failed: RuntimeError: CUDA_ERROR_LAUNCH_FAILED"):
        torch.testing.assert_close(kernels.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0], want, rtol=0, atol=0)
    # A correct kernel passes its check silently.
    monkeypatch.setattr(kernels, "_trusted", {})
    monkeypatch.setattr(cuda, "guided_euler", reference.guided_euler)
    monkeypatch.setattr(cuda, "guided_heun", reference.guided_heun)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(kernels.guided_euler(x, m, d, 2.0, 1.0, 0.5)[0], want, rtol=0, atol=0)
    assert all(kernels._trusted.values())
