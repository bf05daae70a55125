"""k-NN precision/recall, the power-function EMA tracker and snapshot files."""

import os

import pytest
import torch

import autoguide_fast as ag
from autoguide_fast import checkpoint
from autoguide_fast.ema import PowerFunctionEMA, power_function_beta
from autoguide_fast.metrics import knn_precision_recall, knn_radii
from autoguide_fast.networks.toy import ToyModel


def test_knn_radii_by_hand():
    pts = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    torch.testing.assert_close(knn_radii(pts, k=1), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    torch.testing.assert_close(knn_radii(pts, k=2), torch.tensor([3.0, 2.0, 3.0, 6.0]))
    with pytest.raises(ValueError, match="k must be in"):
        knn_radii(pts, k=4)


def test_knn_precision_recall_by_hand():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: all 1
    fake = torch.tensor([[0.5], [2.9], [10.0], [11.0]])  # k=1 radii: 2.4, 2.4, 1, 1
    p, r = knn_precision_recall(real, fake, k=1, chunk=3)
    assert p == 0.5  # 0.5 and 2.9 lie within 1 of a real point
    assert r == 1.0  # every real point lies within 2.4 of 0.5 or 2.9
    same = torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    assert knn_precision_recall(same, same.clone()) == (1.0, 1.0)
    assert knn_precision_recall(same, same + 100.0) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same D"):
        knn_precision_recall(same, same[:, :2])


@pytest.mark.parametrize("dim", [2, 3])
def test_knn_tree_equals_brute_force(monkeypatch, dim):
    # Low-dimensional features take a k-d tree (float64 distances), wide ones chunked cdist
    # (float32, whose |x|^2 + |y|^2 - 2 x.y form loses digits on short distances far from the
    # origin): the tree's radii are the float64 ones rounded to float32, and precision and recall
    # are the brute force's up to a point on a ball's boundary, which float32 may put on either
    # side (none here).
    from autoguide_fast.metrics import knn

    g = torch.Generator().manual_seed(dim)
    real = torch.randn(1500, dim, generator=g)
    fake = torch.cat([torch.randn(1200, dim, generator=g) * 1.3, torch.randn(30, dim, generator=g) + 8])
    tree = knn_radii(fake, k=3), knn_precision_recall(real, fake, k=3, chunk=100)
    monkeypatch.setattr(knn, "TREE_MAX_DIM", 0)
    brute = knn_radii(fake, k=3), knn_precision_recall(real, fake, k=3, chunk=100)
    exact = torch.cdist(fake.double(), fake.double()).topk(4, largest=False).values[:, 3]
    torch.testing.assert_close(tree[0], exact.float(), rtol=2**-23, atol=0)  # 1 ulp
    torch.testing.assert_close(brute[0], exact.float(), rtol=1e-3, atol=0)
    assert tree[1] == brute[1] and 0.3 < tree[1][0] < 1 and 0.3 < tree[1][1] < 1


def test_power_function_ema_tracks_the_profile():
    net = torch.nn.Linear(3, 2)
    ema = PowerFunctionEMA(net, stds=[0.05, 0.1])
    history = []
    for t in range(1, 40):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        history.append(net.weight.detach().clone())
        ema.update(t, 1)
    for std, copy in zip(ema.stds, ema.emas):
        want = history[0]
        for t in range(2, 40):
            want = want.lerp(history[t - 1], 1 - power_function_beta(std, t, 1))
        torch.testing.assert_close(copy.weight, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="std must be"):
        PowerFunctionEMA(net, stds=[0.5])


def test_snapshot_round_trip(tmp_path):
    net = ToyModel(num_layers=2, hidden_dim=8)
    with torch.no_grad():
        net.gain.fill_(0.7)
    path = tmp_path / "sub" / "net.safetensors"
    ag.save(net, path, nimg=1234, note="hello")
    meta = checkpoint.read_metadata(path)
    assert meta["arch"] == "toy" and meta["nimg"] == "1234" and meta["note"] == "hello"
    back = ag.load(path)
    assert not back.training and back.config == net.config
    x, s = torch.randn(16, 2), torch.rand(16) + 0.1
    torch.testing.assert_close(back.logp(x, s), net.eval().logp(x, s))
    assert sorted(os.listdir(path.parent)) == ["net.safetensors"]  # no temporary files left


def test_snapshot_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ag.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="not an autoguide_fast network snapshot"):
        ag.load(tmp_path / "plain.safetensors")
    with pytest.raises(TypeError, match="module must be one of"):
        ag.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="metadata must map str to str"):
        checkpoint.save({"w": torch.zeros(1)}, tmp_path / "y.safetensors", {"n": 1})


def test_raw_tensors_interoperate_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).half()}
    checkpoint.save(tensors, tmp_path / "t.safetensors", {"k": "v"})
    for got in (load_file(tmp_path / "t.safetensors"), checkpoint.load(tmp_path / "t.safetensors")):
        assert set(got) == set(tensors)
        for k in tensors:
            torch.testing.assert_close(got[k], tensors[k], rtol=0, atol=0)
    assert checkpoint.read_metadata(tmp_path / "t.safetensors") == {"k": "v"}
