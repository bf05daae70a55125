"""EDM2 network: reference vectors, presets, inference weight cache, the loss."""

import json

import pytest
import torch
from safetensors import safe_open

import autoguide_fast as ag
from autoguide_fast.networks import PRESETS, Block, Precond, mp_attention
from autoguide_fast.training import edm2_loss
from conftest import REFERENCE_DIR, rel_err


def config_of(name):
    with safe_open(str(REFERENCE_DIR / name), framework="pt") as f:
        return json.loads(f.metadata()["config"])


def state_of(ref):
    return {k.removeprefix("state."): v for k, v in ref.items() if k.startswith("state.")}


def load_reference_net(reference, name):
    ref = reference(name)
    net = Precond(**config_of(name)).eval()
    net.load_state_dict(state_of(ref))
    return net, ref


@pytest.mark.parametrize("name", ["precond_cond", "precond_cond_guide", "precond_uncond"])
def test_precond_matches_reference(reference, name):
    net, ref = load_reference_net(reference, f"{name}.safetensors")
    with torch.no_grad():
        D, logvar = net(ref["in.x"], ref["in.sigma"], ref.get("in.labels"), return_logvar=True)
    assert rel_err(D, ref["out.D"]) < 1e-5
    assert rel_err(logvar.flatten(), ref["out.logvar"]) < 1e-5


def test_block_and_attention_core_match_reference(reference):
    ref = reference("block_attention.safetensors")
    cfg = config_of("block_attention.safetensors")
    num_heads = cfg.pop("num_heads")
    block = Block(**cfg).eval()
    block.load_state_dict(state_of(ref))
    assert block.num_heads == num_heads
    with torch.no_grad():
        assert rel_err(block(ref["in.x"], ref["in.emb"]), ref["out.y"]) < 1e-5
    assert rel_err(mp_attention(ref["attn.in.qkv"], num_heads), ref["attn.out.y"]) < 1e-5


def test_attention_equals_explicit_softmax_in_float64():
    qkv = torch.randn(2, 3 * 5 * 8, 3, 7, dtype=torch.float64)  # 5 heads of 8 channels, 21 tokens
    n, heads = 2, 5
    y = qkv.reshape(n, heads, -1, 3, 21)
    y = y / (1e-4 + y.norm(dim=2, keepdim=True) / 8**0.5)
    q, k, v = y.unbind(3)
    w = torch.einsum("nhcq,nhck->nhqk", q, k / 8**0.5).softmax(dim=3)
    want = torch.einsum("nhqk,nhck->nhcq", w, v).reshape(n, 40, 3, 7)
    torch.testing.assert_close(mp_attention(qkv, heads), want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="divisible by 3 \\* num_heads"):
        mp_attention(qkv, 7)


@pytest.mark.parametrize("name, weight", [("sampler_autoguidance", 2.0), ("sampler_unguided", 1.0)])
def test_sampler_matches_reference(reference, name, weight):
    main, _ = load_reference_net(reference, "precond_cond.safetensors")
    guide, _ = load_reference_net(reference, "precond_cond_guide.safetensors")
    ref = reference(f"{name}.safetensors")
    cfg = config_of(f"{name}.safetensors")
    x = ag.sample(
        main,
        ref["in.noise"],
        ref["in.labels"],
        guidance=ag.Autoguidance(guide, weight),
        steps=cfg["num_steps"],
        sigma_min=cfg["sigma_min"],
        sigma_max=cfg["sigma_max"],
        rho=cfg["rho"],
    )
    assert rel_err(x, ref["out.x"]) < 1e-4


def test_edm2_loss_matches_reference(reference):
    net, _ = load_reference_net(reference, "precond_cond.safetensors")
    ref = reference("edm2_loss.safetensors")
    loss = edm2_loss(
        net, ref["in.images"], ref["in.labels"], sigma=ref["in.sigma"], scaled_noise=ref["in.noise_scaled"]
    )
    assert rel_err(loss, ref["out.loss"]) < 1e-5


def test_presets_match_the_published_manifest(reference):
    manifest = reference("edm2_presets_manifest.json")
    for name, want in manifest.items():
        assert {k: v for k, v in PRESETS[name].items() if k in want["config"]} == want["config"]
        with torch.device("meta"):
            net = Precond(**PRESETS[name])
        assert {k: list(v.shape) for k, v in net.state_dict().items()} == want["tensors"], name
        assert sum(p.numel() for p in net.parameters()) == want["num_params"], name


@pytest.mark.parametrize("name", ["digits-s", "digits-xs", "digits-xxs", "img32-s", "img32-xs"])
def test_small_presets_run(name):
    torch.manual_seed(0)
    net = Precond(**PRESETS[name]).eval()
    cfg = PRESETS[name]
    x = torch.randn(2, cfg["img_channels"], cfg["img_resolution"], cfg["img_resolution"])
    labels = torch.eye(cfg["label_dim"])[:2]
    with torch.no_grad():
        assert net(x, torch.tensor([0.5, 2.0]), labels).shape == x.shape


def test_inference_weight_cache_is_exact_and_invalidated():
    torch.manual_seed(0)
    net = Precond(**PRESETS["digits-xs"])
    x, sigma, labels = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0]), torch.eye(10)[:3]
    # Make the gains non-zero so that every weight matters.
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.3)
    net.eval()
    with torch.no_grad():
        first = net(x, sigma, labels)
        cached, _ = net(x, sigma, labels, return_logvar=True)
        assert all(m._cache is not None for m in net.modules() if hasattr(m, "_cache"))
    torch.testing.assert_close(first, cached, rtol=0, atol=0)
    # An in-place weight update (optimizer step, EMA lerp_) invalidates the cache.
    with torch.no_grad():
        net.unet.out_conv.weight.mul_(-1.0)
        flipped = net(x, sigma, labels)
    assert not torch.allclose(flipped, first)
    # A gain update does too.
    with torch.no_grad():
        net.unet.out_gain.fill_(0.0)
        torch.testing.assert_close(net(x, sigma, labels), x * 0.25 / (sigma**2 + 0.25).reshape(-1, 1, 1, 1))
    # load_state_dict and train() clear it; a fresh uncached network gives the same numbers.
    other = Precond(**PRESETS["digits-xs"]).eval()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(x, sigma, labels), net(x, sigma, labels), rtol=0, atol=0)
    net.train()
    assert all(m._cache is None for m in net.modules() if hasattr(m, "_cache"))


def test_eval_mode_with_gradients_does_not_cache():
    net = Precond(**PRESETS["digits-xs"]).eval()
    x = torch.randn(1, 1, 8, 8)
    net(x, torch.tensor([1.0]), torch.eye(10)[:1]).sum().backward()
    assert net.unet.out_conv.weight.grad is not None
    assert all(m._cache is None for m in net.modules() if hasattr(m, "_cache"))


def test_network_snapshot_round_trip(tmp_path):
    torch.manual_seed(1)
    net = Precond(**PRESETS["digits-xs"]).eval()
    ag.save(net, tmp_path / "net.safetensors", nimg=100)
    back = ag.load(tmp_path / "net.safetensors")
    assert back.config == net.config
    x, s = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 3.0])
    with torch.no_grad():
        torch.testing.assert_close(
            back(x, s, torch.eye(10)[:2]), net(x, s, torch.eye(10)[:2]), rtol=0, atol=0
        )


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="img_resolution must be a positive integer"):
        Precond(img_resolution=0, img_channels=3, label_dim=0)
    with pytest.raises(ValueError, match="label_dim must be an integer >= 0"):
        Precond(img_resolution=8, img_channels=3, label_dim=-1)
    with pytest.raises(ValueError, match="flavor must be"):
        Block(8, 8, 8, flavor="mid")
