"""The 2D toy: ground truth, toy model, training, metrics and the experiment, against the
reference vectors and independent float64 computations."""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from autoguide_fast import Autoguidance, _core, sample
from autoguide_fast.networks.toy import ToyModel, ToyStack
from autoguide_fast.studies import toy
from conftest import rel_err


def mixture_reference(gt, x, sigma):
    """Straightforward float64 log-density and score of a Gaussian mixture (explicit inverses)."""
    x = x.double()
    s2 = torch.as_tensor(sigma, dtype=torch.float64).broadcast_to(x.shape[:-1])[:, None, None, None] ** 2
    cov = gt.Sigma + s2 * torch.eye(2, dtype=torch.float64)  # [N, K, 2, 2]
    inv = torch.linalg.inv(cov)
    y = gt.mu - x[:, None, :]  # [N, K, 2]
    z = (inv @ y[..., None])[..., 0]
    logw = gt.phi.log() - math.log(2 * math.pi) - 0.5 * torch.logdet(cov) - 0.5 * (y * z).sum(-1)
    logp = torch.logsumexp(logw, -1)
    r = (logw - logp[:, None]).exp()
    return logp, (r[..., None] * z).sum(-2), logw.argmax(-1)


@pytest.mark.parametrize("classes", ["A", "B", "AB"])
def test_ground_truth_equals_reference(reference, classes):
    ref = reference("toy.safetensors")
    gt = toy.ground_truth(classes)
    assert len(gt) == (2032 if classes == "AB" else 1016)
    for key, ours in (("phi", gt.phi), ("mu", gt.mu), ("Sigma", gt.Sigma)):
        torch.testing.assert_close(ours.float(), ref[f"gt.{classes}.{key}"], rtol=1e-7, atol=0)


def test_ground_truth_logp_and_score_match_reference(reference):
    ref = reference("toy.safetensors")
    gt = toy.ground_truth("A")
    x, s = ref["eval.x"], ref["eval.sigma"]
    assert rel_err(gt.logp(x, s), ref["eval.A.logp"]) < 1e-5
    assert rel_err(gt.score(x, s), ref["eval.A.score"]) < 1e-5


@pytest.mark.parametrize("classes", ["A", "AB"])
def test_mixture_evaluation_matches_float64_reference(classes):
    gt = toy.ground_truth(classes)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(200, 2, generator=g) * 3 - 1.5, torch.tensor([[40.0, -30.0], [0.5, 0.5]])])
    sigma = torch.cat([torch.zeros(50), (torch.randn(152, generator=g) * 1.5 - 2.3).exp()])
    logp, score, comp = gt._eval(x.double(), sigma.double())
    ref_logp, ref_score, ref_comp = mixture_reference(gt, x, sigma)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(score, ref_score, rtol=1e-8, atol=1e-8)
    assert (comp == ref_comp).float().mean() > 0.99  # ties aside, the same most responsible component


def mixture_score_f32(gt, x, sigma):
    """The same score computed by torch in float32 (logdet, inverse, softmax): the framework's
    float32 error, which the core's float32 path must not exceed by more than 2x."""
    x = x.float()
    s2 = torch.as_tensor(sigma, dtype=torch.float32).broadcast_to(x.shape[:-1])[:, None, None, None] ** 2
    cov = gt.Sigma.float() + s2 * torch.eye(2)
    y = gt.mu.float() - x[:, None, :]
    z = (torch.linalg.inv(cov) @ y[..., None])[..., 0]
    logw = gt.phi.float().log() - 0.5 * torch.logdet(cov) - 0.5 * (y * z).sum(-1)
    return (torch.softmax(logw, -1)[..., None] * z).sum(-2)


@pytest.mark.parametrize("classes", ["A", "AB"])
def test_float32_score_is_as_accurate_as_torch_float32(classes):
    # Training points (sigma ~ the recipe's log-normal, x ~ p(x; sigma)) and points anywhere.
    gt = toy.ground_truth(classes)
    g = torch.Generator().manual_seed(6)
    sigma = (torch.randn(2000, generator=g) * 1.5 - 2.3).exp()
    points = {
        "training": (gt.sample(2000, sigma, generator=g), sigma),
        "uniform": (
            torch.rand(300, 2, generator=g) * 3 - 1.5,
            torch.cat([torch.zeros(50), (torch.randn(250, generator=g) * 1.5 - 2.3).exp()]),
        ),
    }
    for x, s in points.values():
        ref = mixture_reference(gt, x, s)[1]
        ours = gt.score_f32(x, s)
        assert ours.dtype == torch.float32 and ours.shape == x.shape
        err = (ours.double() - ref).norm(dim=-1) / ref.norm(dim=-1)
        torch_err = (mixture_score_f32(gt, x, s).double() - ref).norm(dim=-1) / ref.norm(dim=-1)
        assert err.max() <= 2 * torch_err.max() and err.max() < 1e-4
        assert err.median() <= 2 * torch_err.median()
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        gt.score_f32(torch.zeros(3, 2), -1.0)


def test_background_score_equals_the_foreground_one():
    # Large enough to take the tiled path (>= 16,384 points); the idle pool runs the same code.
    gt = toy.ground_truth("A")
    g = torch.Generator().manual_seed(8)
    sigma = (torch.randn(4, 5000, generator=g) * 1.5 - 2.3).exp()
    x = gt.sample(20000, sigma.reshape(-1), generator=g).reshape(4, 5000, 2)
    pending = [gt.score_f32_start(x[i], sigma[i]) for i in range(2)] + [gt.score_f32_start(x, sigma)]
    assert torch.equal(pending[2](), gt.score_f32(x, sigma))
    for i in range(2):
        assert torch.equal(pending[i](), gt.score_f32(x[i], sigma[i]))
    with pytest.raises(RuntimeError, match="already taken"):
        pending[0]()
    # Bad input raises when the job is started, not when its result is taken.
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        gt.score_f32_start(torch.zeros(3, 2), torch.tensor([0.1, float("nan"), 0.2]))
    with pytest.raises(ValueError, match="x must be finite"):
        gt.score_f32_start(torch.tensor([[0.0, float("inf")]]), 0.5)


def test_score_is_the_gradient_of_logp():
    gt = toy.ground_truth("A")
    x = torch.tensor([[0.4, 0.5], [0.9, 0.2], [0.1, 1.0]], dtype=torch.float64)
    s, h = torch.tensor([0.05, 0.2, 1.0], dtype=torch.float64), 1e-6
    fd = torch.stack(
        [(gt.logp(x + h * e, s) - gt.logp(x - h * e, s)) / (2 * h) for e in torch.eye(2).double()], -1
    )
    torch.testing.assert_close(gt.score(x, s), fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_samples_have_the_mixture_moments(sigma):
    gt = toy.ground_truth("AB")
    x = gt.sample(200_000, sigma, generator=torch.Generator().manual_seed(3)).double()
    mean = (gt.phi[:, None] * gt.mu).sum(0)
    second = (gt.phi[:, None, None] * (gt.Sigma + gt.mu[:, :, None] * gt.mu[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :] + sigma**2 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(x.mean(0), mean, atol=4e-3, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=4e-3, rtol=0)


def test_exact_denoiser_samples_the_ground_truth():
    # The sampler with the exact denoiser, started from p(x; 5), must land on p(x; 0).
    gt = toy.ground_truth("A")
    g = torch.Generator().manual_seed(4)
    noise = gt.sample(4096, 5.0, generator=g).double() / 5.0
    x = sample(gt, noise, sigma_max=5.0, steps=32)
    m = toy.evaluate(x.float(), num_knn_ref=4096)
    assert m["precision"] > 0.97
    assert m["knn_precision"] > 0.9 and m["knn_recall"] > 0.9
    assert m["branch_tvd"] < 0.12


def test_toy_model_matches_reference(reference):
    ref = reference("toy.safetensors")
    cfg = json.loads(_metadata()["config"])["toymodel"]
    net = ToyModel(**cfg).eval()
    state = {k.removeprefix("toymodel.state."): v for k, v in ref.items() if k.startswith("toymodel.state.")}
    assert set(state) == set(net.state_dict())
    net.load_state_dict(state)
    x, s = ref["eval.x"], ref["eval.sigma"]
    assert rel_err(net.logp(x, s), ref["toymodel.logp"]) < 1e-5
    assert rel_err(net.score(x, s), ref["toymodel.score"]) < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(
            net(x, s), x + s[:, None] ** 2 * ref["toymodel.score"], rtol=1e-5, atol=1e-6
        )
    with pytest.raises(ValueError, match="labels must be None"):
        net(x, s, torch.ones(64, 2))


def _metadata():
    from safetensors import safe_open

    from conftest import REFERENCE_DIR

    with safe_open(str(REFERENCE_DIR / "toy.safetensors"), framework="pt") as f:
        return f.metadata()


def test_training_learns_the_score():
    gt = toy.ground_truth("A")
    x = gt.sample(2048, 0.3, generator=torch.Generator().manual_seed(5))
    target = gt.score(x, 0.3)

    def err(net):
        return float((net.score(x, 0.3) - target).norm() / target.norm())

    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained = err(ToyModel(hidden_dim=32).eval())
    trained = toy.train("A", hidden_dim=32, iters=150, batch_size=512)
    assert not trained.training and not any(p.requires_grad for p in trained.parameters())
    assert err(trained) < 0.5 * untrained
    again = toy.train("A", hidden_dim=32, iters=150, batch_size=512)
    for a, b in zip(trained.parameters(), again.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # seeded: reproducible


def _autograd_loss(net, x, sigma, target):
    net.zero_grad()
    loss = (sigma**2 * (target - net.score(x, sigma)).square().mean(-1)).mean()
    loss.backward()
    return loss.detach(), [layer.weight.grad for layer in net.layers[::2]] + [net.gain.grad]


def rel_errs(grads, refs):
    """Largest relative error of every tensor of ``grads`` against ``refs``: [len(grads)]."""
    return torch.stack([(g.double() - r).abs().max() / r.abs().max() for g, r in zip(grads, refs)])


def test_stack_gradients_equal_autograd():
    # Explicit formulas vs double back-propagation through ToyModel: equal in float64, and in
    # float32 (three models stacked) no further from float64 than autograd in float32 is.
    g = torch.Generator().manual_seed(7)
    x, target = torch.randn(3, 300, 2, generator=g), torch.randn(3, 300, 2, generator=g)
    sigma = (torch.randn(3, 300, generator=g) * 1.5 - 2.3).exp()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        nets = [ToyModel(num_layers=3, hidden_dim=24).double().train() for _ in range(3)]
    for net, gain in zip(nets, (0.7, -1.3, 2.0)):
        net.gain.data.fill_(gain)
        net.layers[0].weight.data /= 1.1  # not yet normalised: the forced normalisation acts
    refs = [
        _autograd_loss(net, x[k].double(), sigma[k].double(), target[k].double())
        for k, net in enumerate(nets)
    ]
    # The forward pass normalised the weights in place; float32 copies start from the same ones.
    nets32 = [ToyModel(num_layers=3, hidden_dim=24) for _ in nets]
    for a, b in zip(nets32, nets):
        a.load_state_dict({k: v.float() for k, v in b.state_dict().items()})
    autograd32 = [_autograd_loss(net.train(), x[k], sigma[k], target[k]) for k, net in enumerate(nets32)]
    stack64, stack32 = ToyStack(nets), ToyStack(nets32)
    for stack, dtype in ((stack64, torch.float64), (stack32, torch.float32)):
        loss = stack.loss_backward(x.to(dtype), sigma.to(dtype), target.to(dtype))
        torch.testing.assert_close(loss.double(), torch.stack([r[0] for r in refs]), rtol=1e-5, atol=0)
    for k, (_, ref_grads) in enumerate(refs):
        grads64 = [w.grad[k] for w in stack64.weights] + [stack64.gain.grad[k]]
        grads32 = [w.grad[k] for w in stack32.weights] + [stack32.gain.grad[k]]

        assert rel_errs(grads64, ref_grads).max() < 1e-12
        # Per model, the largest relative error of autograd's float32 gradients sets the bound.
        assert rel_errs(grads32, ref_grads).max() <= 2 * rel_errs(autograd32[k][1], ref_grads).max()
    # In blocks of points (128, 128, 44): the same sums, grouped by block.
    stack64.BLOCK = 128
    loss = stack64.loss_backward(x.double(), sigma.double(), target.double())
    torch.testing.assert_close(loss, torch.stack([r[0] for r in refs]), rtol=1e-12, atol=0)
    for k, (_, ref_grads) in enumerate(refs):
        grads64 = [w.grad[k] for w in stack64.weights] + [stack64.gain.grad[k]]
        assert rel_errs(grads64, ref_grads).max() < 1e-12


def test_compiled_stack_gradients_equal_eager(monkeypatch):
    # torch.compile fuses the block's elementwise passes: float32 rounding differs from eager's,
    # within what autograd's own float32 gradients differ from float64 (or, without a C++
    # compiler, the eager block serves after one warning). The torch path, not the core's.
    monkeypatch.setenv("AUTOGUIDE_TOY", "torch")
    g = torch.Generator().manual_seed(8)
    x, target = torch.randn(2, 200, 2, generator=g), torch.randn(2, 200, 2, generator=g)
    sigma = (torch.randn(2, 200, generator=g) * 1.5 - 2.3).exp()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        nets = [ToyModel(num_layers=2, hidden_dim=16).double().train() for _ in range(2)]
    for net, gain in zip(nets, (0.9, -1.1)):
        net.gain.data.fill_(gain)
    refs = [
        _autograd_loss(net, x[k].double(), sigma[k].double(), target[k].double())
        for k, net in enumerate(nets)
    ]
    nets32 = [ToyModel(num_layers=2, hidden_dim=16) for _ in nets]
    for a, b in zip(nets32, nets):
        a.load_state_dict({k: v.float() for k, v in b.state_dict().items()})
    autograd32 = [_autograd_loss(net.train(), x[k], sigma[k], target[k]) for k, net in enumerate(nets32)]
    stack = ToyStack(nets32).compile_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = stack.loss_backward(x, sigma, target)
    assert stack.compiled or any("compiling the toy training step failed" in str(w.message) for w in caught)
    torch.testing.assert_close(loss.double(), torch.stack([r[0] for r in refs]), rtol=1e-5, atol=0)
    for k, (_, ref_grads) in enumerate(refs):
        grads32 = [w.grad[k] for w in stack.weights] + [stack.gain.grad[k]]
        assert rel_errs(grads32, ref_grads).max() <= 2 * rel_errs(autograd32[k][1], ref_grads).max()


core_only = pytest.mark.skipif(
    not all(_core.toy_mlp_available(h) for h in (16, 32, 64)), reason="the core's toy kernel needs AVX-512"
)


@core_only
@pytest.mark.parametrize("layers,hidden", [(2, 16), (3, 32), (4, 64)])
def test_core_stack_gradients_within_float32_error(layers, hidden):
    # The Rust core's training kernel (float32, tiles of points, its own order of sums) against
    # double back-propagation in float64: no further than autograd in float32 is, per model;
    # 1,000 points (padded blocks), gains of both signs, unnormalised weights.
    g = torch.Generator().manual_seed(9)
    x, target = torch.randn(2, 1000, 2, generator=g), torch.randn(2, 1000, 2, generator=g) * 3
    sigma = (torch.randn(2, 1000, generator=g) * 1.5 - 2.3).exp()
    with torch.random.fork_rng():
        torch.manual_seed(2)
        nets = [ToyModel(num_layers=layers, hidden_dim=hidden).double().train() for _ in range(2)]
    for net, gain in zip(nets, (0.8, -1.4)):
        net.gain.data.fill_(gain)
        net.layers[2].weight.data *= 1.2
    refs = [
        _autograd_loss(net, x[k].double(), sigma[k].double(), target[k].double())
        for k, net in enumerate(nets)
    ]
    nets32 = [ToyModel(num_layers=layers, hidden_dim=hidden) for _ in nets]
    for a, b in zip(nets32, nets):
        a.load_state_dict({k: v.float() for k, v in b.state_dict().items()})
    autograd32 = [_autograd_loss(net.train(), x[k], sigma[k], target[k]) for k, net in enumerate(nets32)]
    stack = ToyStack(nets32)
    assert stack.uses_core
    loss = stack.loss_backward(x, sigma, target)
    torch.testing.assert_close(loss.double(), torch.stack([r[0] for r in refs]), rtol=1e-5, atol=0)
    for k, (_, ref_grads) in enumerate(refs):
        grads32 = [w.grad[k] for w in stack.weights] + [stack.gain.grad[k]]
        assert rel_errs(grads32, ref_grads).max() <= 2 * rel_errs(autograd32[k][1], ref_grads).max()


@core_only
@pytest.mark.parametrize("hidden", [16, 32, 64])
def test_core_score_within_float32_error(hidden, monkeypatch):
    # Sampling's score from the core's kernel against float64: no further than torch's float32
    # arithmetic of the same formulas; hidden widths the kernel lacks take torch's path.
    torch.manual_seed(4)
    net = ToyModel(num_layers=4, hidden_dim=hidden).eval()
    net.gain.data.fill_(-1.6)
    x = torch.randn(3001, 2) * 2
    sigma = (torch.randn(3001) * 2 - 1).exp()
    want = net.double().score(x.double(), sigma.double())
    net.float()
    got = net.score(x, sigma)
    monkeypatch.setenv("AUTOGUIDE_TOY", "torch")
    torch32 = net.score(x, sigma)
    err = ((got.double() - want).norm(dim=-1) / want.norm(dim=-1)).max()
    assert 0 < err <= 2 * ((torch32.double() - want).norm(dim=-1) / want.norm(dim=-1)).max()
    monkeypatch.setenv("AUTOGUIDE_TOY", "rust")
    with pytest.raises(ValueError, match="AUTOGUIDE_TOY must be 'core' or 'torch', got 'rust'"):
        net.score(x, sigma)


def test_training_together_equals_alone():
    # Stacking runs batches the arithmetic, not the data: each run draws from its own generator.
    # With one thread every run of a stack is bit for bit the run alone; with more, the BLAS may
    # split the stacked products differently (float32 rounding: test_stack_gradients_equal_autograd).
    runs = [("A", 0), ("AB", 2), ("A", 10)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        together = toy.train_together(runs, 2, 16, [3, 5], 256, (0.01, 0.05))
        for (classes, seed), snaps in zip(runs, together):
            alone = toy.train_snapshots(classes, 2, 16, (3, 5), 256, seed, ema_stds=(0.01, 0.05))
            assert sorted(snaps) == sorted(alone)
            for key, net in alone.items():
                for a, b in zip(snaps[key].state_dict().values(), net.state_dict().values()):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_evaluate_on_known_distributions():
    gt = toy.ground_truth("A")
    own = toy.evaluate(gt.sample(8192, 0, generator=torch.Generator().manual_seed(9)))
    assert 0.975 <= own["precision"] <= 1.0  # 1% quantile threshold: ~0.99 for GT samples
    assert own["knn_precision"] > 0.9 and own["knn_recall"] > 0.9 and own["branch_tvd"] < 0.07
    other = toy.evaluate(toy.ground_truth("B").sample(2048, 0, generator=torch.Generator().manual_seed(9)))
    assert other["precision"] < 0.05 and other["knn_precision"] < 0.05 and other["knn_recall"] < 0.05
    # All samples on one branch: precise, no recall, large branch TVD.
    one = gt.mu[:8].float().repeat(100, 1)
    m = toy.evaluate(one)
    assert m["precision"] == 1.0 and m["knn_recall"] < 0.05 and m["branch_tvd"] > 0.7
    with pytest.raises(ValueError, match="samples must be finite"):
        toy.evaluate(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="classes must be one of"):
        toy.evaluate(one, classes="C")


def test_experiment_quick_run_over_seeds(tmp_path, capsys):
    from autoguide_fast.cli import main

    assert main(["toy", "--quick", "--seeds", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    weights = ("1.5", "2", "2.5", "3", "4")
    methods = ["ground_truth", "none"] + [f"{k}_w{w}" for k in ("autoguidance", "cfg") for w in weights]
    assert list(result["metrics"]) == methods and result["seeds"] == 2
    sets = result["sets"]
    assert [s["train_seeds"] for s in sets] == [
        dict(main=0, guide=1, uncond=2),
        dict(main=10, guide=11, uncond=12),
    ]
    for name in methods:
        for m in toy.METRICS:
            values = [s["metrics"][name][m] for s in sets]
            assert all(np.isfinite(values))
            assert result["metrics"][name][m] == pytest.approx(np.mean(values), rel=1e-12, abs=1e-12)
            assert result["std"][name][m] == pytest.approx(np.std(values, ddof=1), rel=1e-12, abs=1e-12)
    # Independent training sets: the same method measures differently on them.
    assert sets[0]["metrics"]["none"] != sets[1]["metrics"]["none"]
    assert (tmp_path / "figure.png").stat().st_size > 10_000
    for k in (0, 1):
        for name in ("main", "guide", "uncond"):
            assert (tmp_path / f"set{k}" / f"{name}.safetensors").is_file()
    table = capsys.readouterr().out
    assert "| autoguidance_w2 | " in table and " ± " in table  # mean ± std over the two sets
    # A second run reuses the trained models and reproduces the metrics exactly.
    assert main(["toy", "--quick", "--seeds", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == result["metrics"]


def test_experiment_single_seed_has_no_deviation(tmp_path, capsys):
    mean = toy.run(tmp_path, seeds=1, quick=True, progress=False)
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["metrics"] == mean
    assert all(v is None for m in result["std"].values() for v in m.values())  # NaN -> null
    assert " ± " not in capsys.readouterr().out


@pytest.mark.parametrize("seeds", [0, -1, 101, 2.5, True])
def test_experiment_refuses_bad_seed_counts(tmp_path, seeds):
    with pytest.raises(ValueError, match="seeds must be an integer in"):
        toy.run(tmp_path / "x", seeds=seeds, quick=True)
    assert not (tmp_path / "x").exists()


def test_mean_std():
    assert toy.mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, math.sqrt(7 / 3)))
    m, s = toy.mean_std([0.5])
    assert m == 0.5 and s is None


def test_train_snapshots_equal_separate_runs():
    # The learning-rate schedule does not depend on the length: the EMA copied at iteration t
    # of one run is the model that a run of t iterations returns, bit for bit.
    snaps = toy.train_snapshots("A", 2, 8, (6, 3), 64, seed=5, ema_stds=(0.05, 0.01, 0.05))
    assert sorted(snaps) == [(3, 0.01), (3, 0.05), (6, 0.01), (6, 0.05)]
    for (t, std), net in snaps.items():
        alone = toy.train("A", 2, 8, t, 64, seed=5, ema_std=std)
        for a, b in zip(net.state_dict().values(), alone.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(snaps[(3, 0.01)].gain, snaps[(6, 0.01)].gain)
    with pytest.raises(ValueError, match="iters must be a positive integer"):
        toy.train_snapshots("A", 2, 8, (0, 3), 64)


def test_experiment_refuses_a_file_as_output(tmp_path, capsys):
    from autoguide_fast.cli import main

    f = tmp_path / "file"
    f.write_text("x")
    assert main(["toy", "--quick", "--out", str(f)]) == 2
    assert "out must be a directory" in capsys.readouterr().err


def test_toy_models_guide_the_sampler():
    # Tiny models: autoguidance with weight 1 equals no guidance exactly, and w != 1 changes samples.
    main_net = toy.train("A", hidden_dim=16, iters=20, batch_size=256, seed=1)
    guide = toy.train("A", hidden_dim=8, iters=5, batch_size=256, seed=2)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    base = sample(main_net, noise, sigma_max=5.0, steps=8)
    torch.testing.assert_close(
        sample(main_net, noise, guidance=Autoguidance(guide, 1.0), sigma_max=5.0, steps=8), base
    )
    assert not torch.allclose(
        sample(main_net, noise, guidance=Autoguidance(guide, 2.0), sigma_max=5.0, steps=8), base
    )


def test_pareto_front_and_margin():
    from autoguide_fast.studies.toy_search import margin, pareto_front

    pts = [(0.9, 0.9), (0.95, 0.8), (0.85, 0.95), (0.8, 0.8), (0.9, 0.85), (0.95, 0.8)]
    # (0.8, 0.8) and (0.9, 0.85) are beaten by (0.9, 0.9); the repeated point stays (a tie).
    assert pareto_front(pts) == [2, 0, 1, 5]
    assert margin(dict(precision=0.96, knn_recall=0.93)) == pytest.approx(0.0)
    assert margin(dict(precision=0.90, knn_recall=0.99)) == pytest.approx(-0.05)


def test_guide_search_quick(tmp_path):
    from autoguide_fast import checkpoint
    from autoguide_fast.studies.toy_search import SearchSpace, search

    space = SearchSpace(
        capacities=((2, 8), (4, 32)),
        lengths=(20, 50),
        ema_stds=(0.010, 0.050),
        screen_weights=(2.0,),
        screen_samples=128,
        finalists=1,
        weights=(2.0, 3.0),
        intervals=(None, (0.0, 0.5)),
        samples=256,
    )
    lines = []
    summary = search(tmp_path, seeds=2, quick=True, space=space, progress=False, log=lines.append)
    root = tmp_path / "search"
    assert {"search.json", "search.md", "pareto.png", "cells.json"} <= {p.name for p in root.iterdir()}
    # Every guide screened on both sets; one finalist, at every weight and interval.
    assert len(summary["screen"]) == 8 and all(r["sets"] == 2 for r in summary["screen"])
    final = summary["final"]
    assert sum(r["method"] == "autoguidance" for r in final) == 4
    assert sum(r["method"] == "cfg" for r in final) == 4 and sum(r["method"] == "none" for r in final) == 1
    best = summary["best"]
    assert best["method"] == "autoguidance" and best["guide"] in summary["finalists"]
    assert best["margin"] == max(r["margin"] for r in final if r["method"] == "autoguidance")
    # Rows are means over the sets of the cached per-set cells.
    cells = json.loads((root / "cells.json").read_text())["cells"]
    iv = "all" if best["interval"] is None else f"{best['interval'][0]:g}-{best['interval'][1]:g}"
    per_set = [cells[f"set{k}|autoguidance|{best['guide']}|w{best['weight']:g}|{iv}|n256"] for k in (0, 1)]
    assert best["mean"]["precision"] == pytest.approx(np.mean([c["precision"] for c in per_set]), abs=1e-12)
    # The search's 4x32 guide at the recipe's length and EMA is the toy run's guide of that set.
    run_guide = checkpoint.load_network(tmp_path / "set1" / "guide.safetensors")
    same = checkpoint.load_network(root / "set1" / "guide-4x32-it50-ema0.01.safetensors")
    for a, b in zip(run_guide.state_dict().values(), same.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # A second search reuses every cell and guide and reports the same numbers.
    assert sum("trained guides" in line for line in lines) == 4  # 2 capacities x 2 sets
    n = len(lines)
    again = search(tmp_path, seeds=2, quick=True, space=space, progress=False, log=lines.append)
    assert again["final"] == final and again["best"] == best
    assert not any("trained" in line for line in lines[n:])
    assert json.loads((root / "cells.json").read_text())["cells"] == cells


def test_score_without_graph_equals_autograd():
    # Sampling's score (explicit backward pass, no graph) against autograd's, float64, at the
    # noise levels of a sampler run and at points anywhere.
    torch.manual_seed(3)
    net = ToyModel(num_layers=3, hidden_dim=24).double().eval()
    net.gain.data.fill_(1.7)
    x = torch.randn(500, 2, dtype=torch.float64) * 2
    for sigma in (5.0, 0.3, 0.002, torch.rand(500, dtype=torch.float64) + 0.01):
        want = net.score(x, sigma, create_graph=True)
        got = net.score(x, sigma)
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(net(x, 0.5), x + 0.25 * net.score(x, 0.5, create_graph=True).detach())
