"""The 2D toy: ground truth, toy model, training, metrics and the experiment, against the
reference vectors and independent float64 computations."""

import json
import math

import numpy as np
import pytest
import torch

from autoguide_fast import Autoguidance, sample, toy
from autoguide_fast.networks.toy import ToyModel
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


def test_experiment_quick_run(tmp_path, capsys):
    from autoguide_fast.cli import main

    assert main(["toy", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "metrics.json").read_text())
    methods = ["ground_truth", "none"] + [f"{k}_w{w}" for k in ("autoguidance", "cfg") for w in (2, 3, 4)]
    assert list(result["metrics"]) == methods
    for m in result["metrics"].values():
        assert set(m) == set(toy.METRICS) and all(np.isfinite(list(m.values())))
    assert (tmp_path / "figure.png").stat().st_size > 10_000
    for name in ("main", "guide", "uncond"):
        assert (tmp_path / f"{name}.safetensors").is_file()
    assert "| autoguidance_w2 |" in capsys.readouterr().out
    # A second run reuses the trained models and reproduces the metrics exactly.
    assert main(["toy", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "reusing" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == result["metrics"]


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
