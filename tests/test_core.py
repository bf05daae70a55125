"""The Rust core through its Python surface: schedule, step plan, power-function EMA math."""

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoguide_fast import _core, edm_sigmas, step_plan
from autoguide_fast.ema import STD_MAX, exp_to_std, power_function_beta, std_to_exp


def closed_form_sigmas(steps, smin, smax, rho):
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return [(a + i / (steps - 1) * (b - a)) ** rho for i in range(steps)] + [0.0]


def test_sigmas_match_the_edm_formula():
    ours = edm_sigmas(32, 0.002, 80.0, 7.0)
    want = closed_form_sigmas(32, 0.002, 80.0, 7.0)
    assert len(ours) == 33 and ours[-1] == 0.0
    assert ours[0] == 80.0 and ours[-2] == 0.002
    assert max(abs(o - w) / max(w, 1e-12) for o, w in zip(ours, want)) < 1e-12


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(steps=0), "steps"),
        (dict(steps=-3), "steps"),
        (dict(sigma_min=0.0), "sigma_min"),
        (dict(sigma_min=-1.0), "sigma_min"),
        (dict(sigma_min=math.nan), "sigma_min"),
        (dict(sigma_max=0.001), "sigma_max"),
        (dict(sigma_max=math.inf), "sigma_max"),
        (dict(rho=0.0), "rho"),
        (dict(rho=math.nan), "rho"),
        (dict(churn=-1.0), "churn"),
        (dict(churn_min=2.0, churn_max=1.0), "churn_range[1]"),
        (dict(interval_lo=2.0, interval_hi=1.0), "interval[1]"),
        (dict(interval_lo=math.nan), "interval[0]"),
    ],
)
def test_invalid_parameters_name_themselves(kwargs, name):
    args = dict(steps=8, sigma_min=0.002, sigma_max=80.0, rho=7.0) | kwargs
    with pytest.raises(ValueError, match="^" + re.escape(name) + " must be"):
        step_plan(**args)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.integers(1, 64),
    churn=st.floats(0, 80),
    churn_lo=st.floats(0, 5),
    lo=st.floats(0, 10),
    span=st.floats(0, 100),
)
def test_plan_is_consistent_with_the_schedule(steps, churn, churn_lo, lo, span):
    sig = edm_sigmas(steps, 0.002, 80.0, 7.0)
    plan = step_plan(steps, 0.002, 80.0, 7.0, churn, churn_lo, 50.0, lo, lo + span)
    assert [s.index for s in plan] == list(range(steps))
    for s in plan:
        assert (s.t_cur, s.t_next) == (sig[s.index], sig[s.index + 1])
        gamma = min(churn / steps, math.sqrt(2) - 1) if churn > 0 and churn_lo <= s.t_cur <= 50.0 else 0.0
        assert s.gamma == pytest.approx(gamma, abs=0)
        assert s.t_hat == pytest.approx(s.t_cur * (1 + gamma), rel=1e-15)
        assert s.second_order == (s.index < steps - 1)
        assert s.guided == (lo <= s.t_hat <= lo + span)
        assert s.guided_next == (s.second_order and lo <= s.t_next <= lo + span)


def test_step_repr_is_readable():
    r = repr(step_plan(2, 0.002, 80.0, 7.0)[0])
    assert r.startswith("Step(index=0, t_cur=80") and "second_order=True" in r


def test_phema_scalars_match_reference(reference):
    ref = reference("phema.json")
    for std, exp in ref["std_to_exp"].items():
        assert std_to_exp(float(std)) == pytest.approx(exp, rel=1e-9, abs=1e-9)
    for exp, std in ref["exp_to_std"].items():
        assert exp_to_std(float(exp)) == pytest.approx(std, rel=1e-9, abs=1e-9)
    for row in ref["power_function_beta"]:
        assert power_function_beta(row["std"], row["t_next"], row["t_delta"]) == pytest.approx(
            row["beta"], rel=1e-9, abs=1e-9
        )


@settings(max_examples=100, deadline=None)
@given(st.floats(0.001, 0.29))
def test_std_exp_round_trip(std):
    assert exp_to_std(std_to_exp(std)) == pytest.approx(std, rel=1e-10)


def test_phema_rejects_bad_values():
    with pytest.raises(ValueError, match="^std must be"):
        std_to_exp(STD_MAX + 1e-6)
    with pytest.raises(ValueError, match="^std must be"):
        std_to_exp(0.0)
    with pytest.raises(ValueError, match="^exp must be"):
        exp_to_std(-1.5)
    with pytest.raises(ValueError, match="^t_delta must be"):
        power_function_beta(0.05, 10.0, 20.0)


def test_stubs_match_the_extension():
    import ast
    from pathlib import Path

    import autoguide_fast

    stub = Path(autoguide_fast.__file__).with_name("_core.pyi")
    tree = ast.parse(stub.read_text())
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert names == public
    for cls in ("Step", "Mixture2D"):
        stub_cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        members = {
            f.name for f in stub_cls.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")
        }
        assert members <= set(dir(getattr(_core, cls)))


def test_tests_run_against_the_installed_wheel():
    import autoguide_fast

    assert "site-packages" in autoguide_fast.__file__, autoguide_fast.__file__
    from pathlib import Path

    assert (Path(autoguide_fast.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("steps", [1_000_001, 10**12, 2**63, 10**30])
def test_huge_step_counts_raise_instead_of_aborting(steps):
    # Each would have asked for steps * 64 bytes at once; the core refuses them first.
    message = "^" + re.escape(f"steps must be in [1, 1000000], got {steps}") + "$"
    with pytest.raises(ValueError, match=message):
        step_plan(steps, 0.002, 80.0, 7.0, 0.0, 0.0, float("inf"), 0.0, float("inf"))
    with pytest.raises(ValueError, match=message):
        edm_sigmas(steps, 0.002, 80.0, 7.0)
    sig = edm_sigmas(1_000_000, 0.002, 80.0, 7.0)
    assert len(sig) == 1_000_001 and sig[0] == 80.0 and sig[-2] == 0.002
