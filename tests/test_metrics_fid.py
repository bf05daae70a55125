"""FID and FD_DINOv2 as the official tools compute them: the detectors against independent
implementations (torch-fidelity's Inception, a compact mirror of facebookresearch/dinov2's forward)
with random weights, the statistics against numpy, the distance against scipy's sqrtm form,
reference files in the official layouts, hostile files refused, the CLI alone and under torchrun."""

import json
import math
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import autoguide_fast as ag
from autoguide_fast.metrics import (
    FeatureStats,
    frechet_distance,
    image_stats,
    load_ref,
    rank_batches,
    save_ref,
)
from autoguide_fast.metrics.inception import InceptionV3
from autoguide_fast.networks.edm2 import Precond
from conftest import rel_err, torchrun_cli

# One float32 network evaluation: the detectors here and their references differ in the order of
# float32 sums (folded batch norm, fused attention), ~1e-7..1e-6 relative; 1e-5 is the bound.
TOL = 1e-5


def _random_inception_state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in InceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        if k.endswith("running_var"):
            state[k] = torch.rand(v.shape, generator=g) * 0.5 + 0.5
        elif k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel())
        elif k.endswith("bn.weight"):
            state[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
    return state


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "pt_inception-random.pth"
    torch.save(_random_inception_state(), path)  # the layout of pt_inception-2015-12-05-*.pth
    return path


@pytest.mark.parametrize("size", [64, 299, 512])
def test_inception_matches_torch_fidelity(inception_file, size):
    tf = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    ref = tf.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception_file)
    )
    ours = ag.metrics.inception(inception_file)
    x = torch.randint(
        0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size)
    )
    want = ref(x)[0]
    got = ours(x)
    assert got.shape == (2, 2048) and got.dtype == torch.float32
    assert rel_err(got, want) <= TOL
    # The resize alone (TF1's bilinear, no half-pixel offset) equals torch-fidelity's exactly on CPU
    # up to the order of two products.
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from autoguide_fast.metrics.inception import resize_tf1_bilinear

    xf = x.float()
    r = interpolate_bilinear_2d_like_tensorflow1x(xf, size=(299, 299), align_corners=False)
    assert (resize_tf1_bilinear(xf, 299) - r).abs().max() <= 1e-4  # values 0..255, float32


def test_inception_refuses_other_weights(tmp_path):
    bad = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="not the Inception-v3"):
        ag.metrics.inception(bad)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        ag.metrics.inception(tmp_path / "missing.pth")


def test_detector_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("AUTOGUIDE_DINOV2", raising=False)
    with pytest.raises(FileNotFoundError, match="AUTOGUIDE_DINOV2.*nothing is downloaded"):
        ag.metrics.weights_path("fd_dinov2")
    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    monkeypatch.setenv("AUTOGUIDE_DINOV2", str(f))
    assert ag.metrics.weights_path("fd_dinov2") == f


# ---------------------------------------------------------------------------------------------
# DINOv2: a compact mirror of facebookresearch/dinov2's DinoVisionTransformer.forward (eval, no
# masks, no registers), written from its source: patch embedding, cls token, position embeddings
# resized by interpolate_pos_encoding (offset 0.1, bicubic, no antialias, scale_factor), pre-norm
# blocks with LayerScale, final norm, class token.


class _RefViT(torch.nn.Module):
    def __init__(self, state: dict, heads: int):
        super().__init__()
        self.s, self.heads = state, heads

    def pos(self, w: int, h: int) -> torch.Tensor:
        pe = self.s["pos_embed"].float()
        n = pe.shape[1] - 1
        m = int(math.sqrt(n))
        w0, h0 = w // 14, h // 14
        sx, sy = float(w0 + 0.1) / m, float(h0 + 0.1) / m
        patch = pe[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, scale_factor=(sx, sy), mode="bicubic", antialias=False)
        assert (w0, h0) == patch.shape[-2:]
        return torch.cat([pe[:, :1], patch.permute(0, 2, 3, 1).view(1, -1, pe.shape[-1])], 1)

    def forward(self, x):
        s = self.s
        b, _, w, h = x.shape
        t = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=14)
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat([s["cls_token"].expand(b, -1, -1), t], 1) + self.pos(w, h)
        dim = t.shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))

        def ln(v, p):
            return F.layer_norm(v, (dim,), s[p + ".weight"], s[p + ".bias"], eps=1e-6)

        for i in range(depth):
            p = f"blocks.{i}."
            y = ln(t, p + "norm1")
            qkv = F.linear(y, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"])
            q, k, v = qkv.reshape(b, -1, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
            a = ((q * (dim // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
            y = (a @ v).transpose(1, 2).reshape(b, -1, dim)
            t = t + s[p + "ls1.gamma"] * F.linear(y, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
            y = F.gelu(F.linear(ln(t, p + "norm2"), s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]))
            t = t + s[p + "ls2.gamma"] * F.linear(y, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
        return ln(t, "norm")[:, 0]


def _random_dinov2_state(dim=128, depth=2, grid=37, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    s = {
        "cls_token": r(1, 1, dim, scale=0.5),
        "pos_embed": r(1, 1 + grid * grid, dim, scale=0.5),
        "mask_token": r(1, dim),
        "patch_embed.proj.weight": r(dim, 3, 14, 14, scale=0.02),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": 1 + r(dim),
        "norm.bias": r(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        s.update(
            {
                p + "norm1.weight": 1 + r(dim),
                p + "norm1.bias": r(dim),
                p + "attn.qkv.weight": r(3 * dim, dim, scale=dim**-0.5),
                p + "attn.qkv.bias": r(3 * dim),
                p + "attn.proj.weight": r(dim, dim, scale=dim**-0.5),
                p + "attn.proj.bias": r(dim),
                p + "ls1.gamma": 0.5 + r(dim),
                p + "ls2.gamma": 0.5 + r(dim),
                p + "norm2.weight": 1 + r(dim),
                p + "norm2.bias": r(dim),
                p + "mlp.fc1.weight": r(4 * dim, dim, scale=dim**-0.5),
                p + "mlp.fc1.bias": r(4 * dim),
                p + "mlp.fc2.weight": r(dim, 4 * dim, scale=(4 * dim) ** -0.5),
                p + "mlp.fc2.bias": r(dim),
            }
        )
    return s


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "dinov2_random_pretrain.pth"
    torch.save(_random_dinov2_state(), path)  # the official state dict layout
    return path


def _official_dinov2_features(state, images, heads):
    # The official preprocessing (calculate_metrics.py DINOv2Detector, resize_mode 'torch').
    x = F.interpolate(images.float(), size=(224, 224), mode="bicubic", antialias=True) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return _RefViT(state, heads)((x - mean) / std)


@pytest.mark.parametrize("size", [64, 256, 512])
def test_dinov2_matches_official_forward(dinov2_file, size):
    pytest.importorskip("timm")
    ours = ag.metrics.dinov2(dinov2_file)
    x = torch.randint(
        0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size)
    )
    want = _official_dinov2_features(torch.load(dinov2_file, weights_only=True), x, heads=2)
    got = ours(x)
    assert got.shape == (3, 128) and got.dtype == torch.float32
    assert rel_err(got, want) <= TOL


def test_dinov2_position_embedding_resize_matters(dinov2_file):
    # timm's own resize (antialiased, to a size) gives other features: the official one is needed,
    # and this comparison would see the difference.
    pytest.importorskip("timm")
    from timm.layers import resample_abs_pos_embed

    state = torch.load(dinov2_file, weights_only=True)
    ours = ag.metrics.dinov2(dinov2_file)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    official = ours(x)
    with torch.no_grad():
        ours.vit.pos_embed.copy_(
            resample_abs_pos_embed(state["pos_embed"], new_size=(16, 16), num_prefix_tokens=1)
        )
    assert rel_err(ours(x), official) > 100 * TOL


def test_dinov2_refuses_non_dinov2_file(tmp_path):
    pytest.importorskip("timm")
    bad = tmp_path / "b.pth"
    torch.save({"weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not DINOv2 weights"):
        ag.metrics.dinov2(bad)


def test_detector_files_with_code_are_not_loaded(tmp_path):
    # A pickle that would run code on load: torch.load(weights_only=True) refuses it.
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    bad = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, bad)
    with pytest.raises(ValueError, match="without executing code"):
        ag.metrics.inception(bad)
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------------------------------------
# Statistics and distance.


def test_streaming_stats_equal_numpy_cov():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((1000, 64)) * rng.uniform(0.1, 10, 64) + rng.uniform(-50, 50, 64)
    s = FeatureStats(64)
    for chunk in np.array_split(f, 7):  # uneven batches
        s.update(torch.from_numpy(chunk).float())
    mu, sigma = s.mu_sigma()
    f32 = f.astype(np.float32).astype(np.float64)  # the features the detectors give are float32
    np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12, atol=1e-12)
    cov = np.cov(f32, rowvar=False)
    assert np.abs(sigma - cov).max() <= 1e-12 * np.abs(cov).max() * 1000**0.5


def test_frechet_distance_equals_sqrtm_form_at_2048():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    d = 2048
    mix = rng.standard_normal((d, d)) * 0.05
    a = rng.standard_normal((3000, d)) @ mix
    b = 1.1 * a[:2500] + 0.3 + 0.2 * rng.standard_normal((2500, d))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    m1, m2 = a.mean(0), b.mean(0)
    sq = scipy_linalg.sqrtm(s1 @ s2)
    sq = sq[0] if isinstance(sq, tuple) else sq
    want = float(np.real(np.square(m1 - m2).sum() + np.trace(s1 + s2 - 2 * sq)))
    got = frechet_distance(m1, s1, m2, s2)
    assert abs(got - want) <= 1e-9 * abs(want)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-8 * np.trace(s1))


def test_frechet_distance_of_singular_covariances():
    # Fewer samples than features: both covariances singular; the value is still the definition's
    # (checked against the symmetric square-root form computed by hand on a small case).
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 8)), rng.standard_normal((6, 8)) + 1
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    want = np.square(a.mean(0) - b.mean(0)).sum() + np.trace(s1) + np.trace(s2) - 2 * cross
    # The zero eigenvalues of S1 S2 come out as round-off of either sign, ~eps |S1| |S2|, and their
    # square roots add up to d sqrt(eps |S1| |S2|) to the trace, in either method.
    noise = 2 * 8 * np.sqrt(np.finfo(float).eps * np.linalg.norm(s1, 2) * np.linalg.norm(s2, 2))
    assert frechet_distance(a.mean(0), s1, b.mean(0), s2) == pytest.approx(want, abs=noise)
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(a.mean(0), s1 * np.nan, b.mean(0), s2)


def test_rank_batches_are_the_official_split():
    for n, batch, world in [(10, 3, 1), (10, 3, 2), (101, 8, 4), (1, 64, 3)]:
        shares = [rank_batches(n, batch, r, world) for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # every rank the same number of batches
        got = np.sort(np.concatenate([np.concatenate(s) for s in shares]))
        np.testing.assert_array_equal(got, np.arange(n))
        assert max(len(b) for s in shares for b in s) <= batch


# ---------------------------------------------------------------------------------------------
# Reference files.


def _stats(seed=0, dims=(("fid", 16), ("fd_dinov2", 8))):
    rng = np.random.default_rng(seed)
    out = {"num_images": 123}
    for name, d in dims:
        a = rng.standard_normal((50, d))
        out[name] = {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}
    return out


def _same(a, b):
    assert set(a) == set(b)
    for k in a:
        if k == "num_images":
            assert a[k] == b[k]
        else:
            for f in ("mu", "sigma"):
                np.testing.assert_array_equal(a[k][f], b[k][f])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_official_pickle_layout_round_trips(tmp_path, protocol):
    stats = _stats()
    official = tmp_path / "img.pkl"
    with open(official, "wb") as f:  # as calculate_metrics.py's save_stats writes it
        pickle.dump(stats, f, protocol=protocol)
    _same(load_ref(official), stats)
    ours = save_ref(stats, tmp_path / "ours.pkl")
    with open(ours, "rb") as f:  # what the official load_stats does with it
        back = pickle.load(f)
    _same(back, stats)
    assert all(back[k]["mu"].dtype == np.float64 for k in ("fid", "fd_dinov2"))


def test_npz_layouts(tmp_path):
    stats = _stats()
    np.savez(tmp_path / "edm1.npz", mu=stats["fid"]["mu"], sigma=stats["fid"]["sigma"])
    _same(load_ref(tmp_path / "edm1.npz"), {"fid": stats["fid"]})
    _same(load_ref(save_ref(stats, tmp_path / "both.npz")), stats)
    only_fid = save_ref({"fid": stats["fid"]}, tmp_path / "fid.npz")
    with np.load(only_fid) as z:
        assert sorted(z.keys()) == ["mu", "sigma"]  # EDM1's layout, for EDM1's tools


def test_hostile_reference_pickle_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    bad = tmp_path / "ref.pkl"
    bad.write_bytes(pickle.dumps({"fid": Payload()}))
    with pytest.raises(ag.AutoguideError, match="posix.system|os.system"):
        load_ref(bad)
    assert not (tmp_path / "ran").exists()
    tensors = tmp_path / "tensor.pkl"
    tensors.write_bytes(pickle.dumps({"fid": {"mu": torch.zeros(2), "sigma": torch.eye(2)}}))
    with pytest.raises(ag.AutoguideError, match="refused"):
        load_ref(tensors)
    bad_shape = _stats()
    bad_shape["fid"]["sigma"] = bad_shape["fid"]["sigma"][:3]
    (tmp_path / "shape.pkl").write_bytes(pickle.dumps(bad_shape))
    with pytest.raises(ValueError, match="sigma"):
        load_ref(tmp_path / "shape.pkl")


# ---------------------------------------------------------------------------------------------
# Image sets, the CLI, torchrun.


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (13, 20, 20, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        sub = root / f"{i // 10:05d}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(im).save(sub / f"img{i:08d}.png")
    Image.fromarray(images[0]).save(root / "grid.png")  # generate's preview: not an image of the set
    with zipfile.ZipFile(root.parent / "imgs.zip", "w") as z:
        for p in sorted(root.rglob("img*.png")):
            z.write(p, p.relative_to(root).as_posix())
    return root, torch.from_numpy(images).permute(0, 3, 1, 2)


class _Mean(torch.nn.Module):
    # A stand-in detector: per-channel means and squares (exact in float32 for uint8 inputs).
    def forward(self, x):
        x = x.float()
        return torch.cat([x.mean((2, 3)), (x**2).mean((2, 3))], 1)


def test_image_stats_stream_folder_and_zip(image_folder):
    root, images = image_folder
    want = FeatureStats(6)
    want.update(_Mean()(images))
    mu, sigma = want.mu_sigma()
    for source in (root, root.parent / "imgs.zip"):
        got = image_stats(source, {"m": _Mean()}, batch=4, device="cpu")
        assert got["num_images"] == 13
        np.testing.assert_allclose(got["m"]["mu"], mu, rtol=1e-12)
        np.testing.assert_allclose(got["m"]["sigma"], sigma, rtol=1e-9)
    # num < N: the official subset (a seeded shuffle of the sorted files, sorted again).
    sub = image_stats(root, {"m": _Mean()}, num=5, seed=7, batch=2, device="cpu")
    idx = np.arange(13)
    np.random.RandomState(7).shuffle(idx)
    part = FeatureStats(6)
    part.update(_Mean()(images[np.sort(idx[:5])]))
    np.testing.assert_allclose(sub["m"]["mu"], part.mu_sigma()[0], rtol=1e-12)
    with pytest.raises(ValueError, match="fewer than num=14"):
        image_stats(root, {"m": _Mean()}, num=14)


def _cli(*args, env=None, launcher=None):
    cmd = [*(launcher or [sys.executable, "-m", "autoguide_fast.cli"]), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_cli_ref_calc_and_torchrun(tmp_path, image_folder, dinov2_file):
    pytest.importorskip("timm")
    root, _ = image_folder
    env = {"OMP_NUM_THREADS": "1", "AUTOGUIDE_DINOV2": str(dinov2_file)}
    one = _cli(
        "metrics",
        "ref",
        "--data",
        root,
        "--out",
        tmp_path / "ref.pkl",
        "--metrics",
        "fd_dinov2",
        "--batch",
        "4",
        "--workers",
        "0",
        "--no-progress",
        env=env,
    )
    assert one.returncode == 0, one.stderr
    assert "13 images" in one.stdout
    launcher = torchrun_cli()
    two = _cli(
        "metrics",
        "ref",
        "--data",
        root,
        "--out",
        tmp_path / "ref2.pkl",
        "--metrics",
        "fd_dinov2",
        "--batch",
        "4",
        "--workers",
        "0",
        "--no-progress",
        env=env,
        launcher=launcher,
    )
    assert two.returncode == 0, two.stderr
    a, b = load_ref(tmp_path / "ref.pkl"), load_ref(tmp_path / "ref2.pkl")
    assert a["num_images"] == b["num_images"] == 13
    # The same float32 features summed in float64 in another order: equal to float64 rounding.
    np.testing.assert_allclose(b["fd_dinov2"]["mu"], a["fd_dinov2"]["mu"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b["fd_dinov2"]["sigma"], a["fd_dinov2"]["sigma"], rtol=1e-9, atol=1e-12)
    calc = _cli(
        "metrics",
        "calc",
        "--images",
        root,
        "--ref",
        tmp_path / "ref.pkl",
        "--metrics",
        "fd_dinov2",
        "--num",
        "13",
        "--workers",
        "0",
        "--out",
        tmp_path / "m.json",
        "--no-progress",
        env=env,
    )
    assert calc.returncode == 0, calc.stderr
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["num_images"] == 13 and abs(result["fd_dinov2"]) < 1e-6  # the same images
    missing = _cli(
        "metrics",
        "calc",
        "--images",
        root,
        "--ref",
        tmp_path / "ref.pkl",
        "--metrics",
        "fid",
        "--num",
        "13",
        env={"AUTOGUIDE_INCEPTION": ""},
    )
    assert missing.returncode == 2 and "pt_inception-2015-12-05-6726825d.pth" in missing.stderr


def test_cli_gen_measures_generated_images(tmp_path, dinov2_file):
    pytest.importorskip("timm")
    net = Precond(
        img_resolution=8,
        img_channels=3,
        label_dim=0,
        model_channels=16,
        channel_mult=(1,),
        num_blocks=1,
        attn_resolutions=(),
    )
    ag.save(net, tmp_path / "net.safetensors")
    env = {"OMP_NUM_THREADS": "1", "AUTOGUIDE_DINOV2": str(dinov2_file)}
    out = _cli(
        "generate",
        "--net",
        tmp_path / "net.safetensors",
        "--seeds",
        "0-5",
        "--steps",
        "4",
        "--out",
        tmp_path / "imgs",
        "--no-progress",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    ref = _cli(
        "metrics",
        "ref",
        "--data",
        tmp_path / "imgs",
        "--out",
        tmp_path / "r.npz",
        "--metrics",
        "fd_dinov2",
        "--workers",
        "0",
        "--no-progress",
        env=env,
    )
    assert ref.returncode == 0, ref.stderr
    gen = _cli(
        "metrics",
        "gen",
        "--net",
        tmp_path / "net.safetensors",
        "--ref",
        tmp_path / "r.npz",
        "--metrics",
        "fd_dinov2",
        "--num",
        "6",
        "--steps",
        "4",
        "--out",
        tmp_path / "g.json",
        "--no-progress",
        env=env,
    )
    assert gen.returncode == 0, gen.stderr
    # gen draws the same seeds 0..5 as generate wrote: the same images, FD 0 up to float64 noise.
    assert abs(json.loads((tmp_path / "g.json").read_text())["fd_dinov2"]) < 1e-6
    assert Path(tmp_path / "g.json").is_file()


def test_sweep_by_fd_dinov2(tmp_path, dinov2_file):
    # sweep --metric fd_dinov2: every cell's value is the FD of that cell's generated images
    # against the reference, computed here independently; a rerun reuses the cells; another
    # reference is another cell key.
    pytest.importorskip("timm")
    from autoguide_fast.generation import generate
    from autoguide_fast.guidance import Autoguidance
    from autoguide_fast.studies.sweep import sweep

    def tiny(channels, seed):
        torch.manual_seed(seed)
        kw = dict(
            img_resolution=8,
            img_channels=3,
            label_dim=0,
            channel_mult=(1,),
            num_blocks=1,
            attn_resolutions=(),
        )
        return Precond(model_channels=channels, **kw).eval()

    ag.save(tiny(16, 0), tmp_path / "main.safetensors")
    ag.save(tiny(8, 1), tmp_path / "guide.safetensors")
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 128))
    save_ref({"fd_dinov2": {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}}, ref)
    lines = []
    settings = dict(seeds=range(6), steps=3, metric="fd_dinov2", ref=ref, detector=dinov2_file)
    best = sweep(
        tmp_path / "main.safetensors",
        tmp_path / "guide.safetensors",
        "1.5,2.0",
        tmp_path / "sw",
        log=lines.append,
        **settings,
    )
    cells = json.loads((tmp_path / "sw" / "cells.json").read_text())
    values = {c["weight"]: c["fd"] for c in cells["cells"].values()}
    net, guide = ag.load(tmp_path / "main.safetensors"), ag.load(tmp_path / "guide.safetensors")
    m = ag.metrics.FrechetMetric("fd_dinov2", ref, dinov2_file)
    for w in (1.5, 2.0):
        images = torch.cat(
            [b.images for b in generate(net, range(6), guidance=Autoguidance(guide, w), steps=3)]
        )
        assert values[w] == pytest.approx(m(images)["fd_dinov2"], rel=1e-9)
    assert best["fd"] == min(values.values())
    assert "FD_DINOv2" in (tmp_path / "sw" / "table.md").read_text()
    lines.clear()
    sweep(
        tmp_path / "main.safetensors",
        tmp_path / "guide.safetensors",
        "1.5,2.0",
        tmp_path / "sw",
        log=lines.append,
        **settings,
    )
    assert not any("w=" in line for line in lines)  # nothing recomputed
    with pytest.raises(ValueError, match="needs ref"):
        sweep(
            tmp_path / "main.safetensors", tmp_path / "guide.safetensors", "2.0", tmp_path / "x", metric="fid"
        )


def _nvidia_archive(state: dict, path: Path) -> None:
    # A TorchScript module with NVIDIA's layout (layers.<TF graph path>.{weight, beta, mean, var},
    # output.*), holding the same weights: what torch.jit.save makes of such a module.
    from autoguide_fast.metrics.detectors import _NVIDIA_LAYERS

    class Conv(torch.nn.Module):
        def __init__(self, prefix):
            super().__init__()
            self.weight = torch.nn.Parameter(state[f"{prefix}.conv.weight"])
            self.beta = torch.nn.Parameter(state[f"{prefix}.bn.bias"])
            self.register_buffer("mean", state[f"{prefix}.bn.running_mean"])
            self.register_buffer("var", state[f"{prefix}.bn.running_var"])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Module()
            for nv, ours in _NVIDIA_LAYERS.items():
                parent = self.layers
                *heads, last = nv.split(".")
                for h in heads:
                    if not hasattr(parent, h):
                        parent.add_module(h, torch.nn.Module())
                    parent = getattr(parent, h)
                parent.add_module(last, Conv(ours))
            self.output = torch.nn.Linear(2048, 1008)
            self.output.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.output(x)

    torch.jit.save(torch.jit.script(Net()), str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_inception_from_nvidia_torchscript(tmp_path, inception_file):
    state = torch.load(inception_file, weights_only=True)
    state = {k: torch.ones_like(v) if k.endswith("bn.weight") else v for k, v in state.items()}
    torch.save(state, tmp_path / "pt.pth")
    _nvidia_archive(state, tmp_path / "inception-2015-12-05.pt")
    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = ag.metrics.inception(tmp_path / "pt.pth")(x)
    got = ag.metrics.inception(tmp_path / "inception-2015-12-05.pt")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same tensors, the same arithmetic


def test_nvidia_resize_equals_tf1_resize():
    # NVIDIA's detector resizes by an affine grid (border padding, align_corners=False) shifted by
    # 1/in - 1/299: the same sampling points i * in / 299 as TF1's bilinear resize.
    from autoguide_fast.metrics.inception import resize_tf1_bilinear

    for size in (32, 64, 300, 512):
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size)) * 255
        theta = torch.eye(2, 3)
        theta[0, 2] += theta[0, 0] / size - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / size - theta[1, 1] / 299
        grid = F.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
        nv = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # grid_sample recovers the source coordinate from float32 normalised ones: ~1e-5 px.
        assert (resize_tf1_bilinear(x, 299) - nv).abs().max() <= 255 * 1e-4
