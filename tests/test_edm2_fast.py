"""The EDM2 inference path (networks.fast) against the plain network it snapshots.

Tolerance: the fast path reorders float32 arithmetic (constant scales folded into weights, one
product for all embeddings, channels_last convolutions), so each layer's result may move by a few
ulp of its magnitude; outputs are O(1) after every magnitude-preserving layer, and errors add up
over the depth. The tests accept (a) a relative error against a float64 run of the same network at
most twice the plain float32 network's plus 1e-7, the criterion flash-attention's tests use, and
(b) a largest difference from the plain network of at most 4 ulp (4 * 2^-23 relative) per block,
times the output's magnitude."""

import math
import warnings

import pytest
import torch

import autoguide_fast as ag
from autoguide_fast.generation import generate
from autoguide_fast.networks import PRESETS, Precond
from autoguide_fast.networks.fast import COMPILE_WORTH_MACS, FastPrecond, for_sampling, optimize
from conftest import rel_err
from test_edm2 import load_reference_net

EPS32 = torch.finfo(torch.float32).eps
FAST_FORWARD = FastPrecond._forward


def random_net(preset: str, seed: int = 0, **changes) -> Precond:
    """A preset network with random weights and non-zero gains (a fresh network's zero gains
    would make the output c_skip x and hide the U-Net)."""
    torch.manual_seed(seed)
    net = Precond(**{**PRESETS[preset], **changes}).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.copy_(torch.rand([]) + 0.5)
    return net


def inputs(net: Precond, batch: int, labels: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    sigma = torch.exp(torch.linspace(math.log(0.002), math.log(80.0), batch))
    y = None
    if labels == "onehot":
        y = torch.eye(net.label_dim)[torch.arange(batch) % net.label_dim]
    elif labels == "soft":
        y = torch.rand(batch, net.label_dim, generator=g).softmax(1)
    return x * sigma.reshape(-1, 1, 1, 1), sigma, y


def check_close(fast_out, plain_out, net: Precond, x, sigma, labels):
    net64 = Precond(**net.config).double().eval()
    net64.load_state_dict(net.state_dict())
    with torch.no_grad():
        want = net64(x.double(), sigma.double(), None if labels is None else labels.double())
    assert rel_err(fast_out, want) <= 2 * rel_err(plain_out, want) + 1e-7
    blocks = sum(1 for m in net.modules() if isinstance(m, ag.networks.Block))
    bound = 4 * EPS32 * blocks * float(plain_out.abs().max())
    assert float((fast_out - plain_out).abs().max()) <= bound


@pytest.mark.parametrize(
    "preset, batch, labels",
    [("digits-xs", 1, "onehot"), ("digits-s", 3, "soft"), ("digits-xxs", 4, None), ("img32-xs", 2, "onehot")],
)
def test_fast_matches_plain_network(preset, batch, labels):
    net = random_net(preset)
    x, sigma, y = inputs(net, batch, labels)
    with torch.no_grad():
        plain = net(x, sigma, y)
    got = optimize(net)(x, sigma, y)
    assert got.shape == plain.shape and got.dtype == torch.float32 and got.is_contiguous()
    check_close(got, plain, net, x, sigma, y)


def test_fast_unconditional_and_other_balances():
    net = random_net("digits-xxs", label_dim=0, concat_balance=0.3, res_balance=0.4, attn_balance=0.2)
    x, sigma, _ = inputs(net, 3, None)
    with torch.no_grad():
        plain = net(x, sigma, torch.ones(3, 5))  # labels are ignored by an unconditional network
    check_close(optimize(net)(x, sigma, torch.ones(3, 5)), plain, net, x, sigma, None)


def test_fast_scalar_sigma_and_broadcast_labels():
    net = random_net("digits-xxs")
    x, _, _ = inputs(net, 3, None)
    with torch.no_grad():
        plain = net(x, 2.5)
    check_close(optimize(net)(x, 2.5), plain, net, x, torch.full((3,), 2.5), torch.zeros(3, 10))


@pytest.mark.parametrize("name", ["precond_cond", "precond_cond_guide", "precond_uncond"])
def test_fast_matches_reference_vectors(reference, name):
    net, ref = load_reference_net(reference, f"{name}.safetensors")
    got = optimize(net)(ref["in.x"], ref["in.sigma"], ref.get("in.labels"))
    assert rel_err(got, ref["out.D"]) < 1e-5


def test_other_inputs_go_to_the_network():
    net = random_net("digits-xxs")
    x, sigma, y = inputs(net, 2, "onehot")
    with torch.no_grad():
        want = net(x.double(), sigma.double(), y.double())
    got = optimize(net)(x.double(), sigma.double(), y.double())
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_snapshot_carries_the_network_attributes():
    net = random_net("digits-xs")
    f = optimize(net)
    assert (f.img_channels, f.img_resolution, f.label_dim, f.config) == (1, 8, 10, net.config)
    assert not f.compiled
    # Multiply-adds per sample: every convolution's weight times its output pixels.
    x, sigma, y = inputs(net, 1, "onehot")
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, sigma, y)
    assert f.macs == pytest.approx(counter.get_total_flops() / 2, rel=0.05)


def test_for_sampling_picks_the_path(monkeypatch):
    net = random_net("digits-xxs")
    x = torch.zeros(2, 1, 8, 8)
    assert isinstance(for_sampling(net, x), FastPrecond)
    assert not for_sampling(net, x).compiled
    assert for_sampling(net, x.double()) is net
    assert for_sampling(net.train(), x) is net
    net.eval()
    other = torch.nn.Identity()
    assert for_sampling(other, x) is other
    monkeypatch.setenv("AUTOGUIDE_EDM2", "plain")
    assert for_sampling(net, x) is net
    monkeypatch.setenv("AUTOGUIDE_EDM2", "compile")
    assert for_sampling(net, x).compiled
    # auto: compiled only when the run's multiply-adds reach COMPILE_WORTH_MACS (torch.compile
    # is lazy: nothing is compiled until a call).
    monkeypatch.setenv("AUTOGUIDE_EDM2", "auto")
    macs = for_sampling(net, x).macs
    assert not for_sampling(net, x, evaluations=0.99 * COMPILE_WORTH_MACS / macs).compiled
    assert for_sampling(net, x, evaluations=COMPILE_WORTH_MACS / macs).compiled
    monkeypatch.setenv("AUTOGUIDE_EDM2", "fast")
    assert not for_sampling(net, x, evaluations=10 * COMPILE_WORTH_MACS / macs).compiled
    monkeypatch.setenv("AUTOGUIDE_EDM2", "fastest")
    with pytest.raises(ValueError, match="AUTOGUIDE_EDM2 must be one of"):
        for_sampling(net, x)
    with pytest.raises(ValueError, match="AUTOGUIDE_EDM2"):
        next(iter(generate(net, [0], steps=2)))


def test_sample_with_autoguidance_matches_plain(monkeypatch):
    main, guide = random_net("digits-xs"), random_net("digits-xxs", seed=1)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.eye(10)[[1, 4, 7]]
    calls = []
    monkeypatch.setattr(FastPrecond, "_forward", lambda self, *a: calls.append(1) or FAST_FORWARD(self, *a))
    fast_x = ag.sample(main, noise, labels, guidance=ag.Autoguidance(guide, 2.0), steps=6)
    assert len(calls) == 2 * (2 * 6 - 1)  # main and guide, Heun: 2 steps - 1 calls each
    monkeypatch.setenv("AUTOGUIDE_EDM2", "plain")
    plain_x = ag.sample(main, noise, labels, guidance=ag.Autoguidance(guide, 2.0), steps=6)
    assert len(calls) == 22
    # Six Heun steps compound the per-call differences; the samples stay equal to float32 precision.
    assert rel_err(fast_x, plain_x) < 1e-5


def test_generate_uses_the_same_images(monkeypatch):
    main = random_net("digits-xxs")
    fast_imgs = torch.cat([b.images for b in generate(main, range(4), batch=2, steps=4)])
    monkeypatch.setenv("AUTOGUIDE_EDM2", "plain")
    plain_imgs = torch.cat([b.images for b in generate(main, range(4), batch=2, steps=4)])
    assert (fast_imgs.int() - plain_imgs.int()).abs().max() <= 1


def test_compiler_failure_warns_once_and_runs_eagerly():
    net = random_net("digits-xxs")
    x, sigma, y = inputs(net, 2, "onehot")
    f = optimize(net)
    eager = f(x, sigma, y)

    def broken(*args):
        raise RuntimeError("no C++ compiler found\nmore detail")

    f._compiled = broken
    with pytest.warns(UserWarning, match="compiling the EDM2 network failed .*no C\\+\\+ compiler found"):
        got = f(x, sigma, y)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    assert not f.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(f(x, sigma, y), eager, rtol=0, atol=0)


def test_rejects_other_networks():
    with pytest.raises(TypeError, match="net must be an EDM2 Precond"):
        optimize(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_compiled_matches_plain_network():
    # Compiling takes a minute or more on a small machine.
    net = random_net("digits-xxs")
    x, sigma, y = inputs(net, 2, "onehot")
    f = optimize(net, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compiler failure would warn
        got = f(x, sigma, y)
    assert f.compiled
    with torch.no_grad():
        plain = net(x, sigma, y)
    check_close(got, plain, net, x, sigma, y)


@pytest.mark.parametrize("preset, batch, labels", [("digits-xs", 1, "onehot"), ("img32-xs", 2, "onehot")])
def test_bfloat16_opt_in_error(preset, batch, labels):
    # bfloat16 keeps 8 significant bits (eps 2^-8): every convolution's inputs and outputs round
    # to it, so the U-Net's relative error is of the order of 2^-8 per block at most when the
    # roundings add up (they mostly cancel: 1-1.5% measured over 10-15 blocks). It is an opt-in
    # because it is far above float32's (~1e-6), which the default path keeps.
    net = random_net(preset)
    x, sigma, y = inputs(net, batch, labels)
    net64 = Precond(**net.config).double().eval()
    net64.load_state_dict(net.state_dict())
    with torch.no_grad():
        want = net64(x.double(), sigma.double(), None if y is None else y.double())
        plain = net(x, sigma, y)
    fast = optimize(net, dtype=torch.bfloat16)
    got = fast(x, sigma, y)
    assert got.dtype == torch.float32 and got.shape == plain.shape and fast.dtype == torch.bfloat16
    blocks = sum(1 for m in net.modules() if isinstance(m, ag.networks.Block))
    assert rel_err(got, want) <= blocks * 2.0**-8
    assert rel_err(got, want) > 100 * rel_err(plain, want)  # the arithmetic is bfloat16's


def test_bfloat16_is_chosen_and_checked(monkeypatch):
    net = random_net("digits-xxs")
    x = torch.zeros(2, 1, 8, 8)
    monkeypatch.setenv("AUTOGUIDE_EDM2", "bf16")
    fast = for_sampling(net, x, evaluations=10 * COMPILE_WORTH_MACS)
    assert isinstance(fast, FastPrecond) and fast.dtype == torch.bfloat16 and not fast.compiled
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16, got torch.float16"):
        optimize(net, dtype=torch.float16)
    with pytest.raises(ValueError, match="compile applies to the float32 path only"):
        optimize(net, compile=True, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="compile applies to the float32 path only"):
        fast.compile_()
