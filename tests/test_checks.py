"""The shared argument checks (autoguide_fast.checks): each returns the canonical value or raises
ValueError/TypeError naming the parameter, and the argparse types built from them report the flag."""

import argparse
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from autoguide_fast import checks


def test_integer_bounds_and_types():
    assert checks.integer("n", 3, 1, 5) == 3 and checks.integer("n", np.int64(7)) == 7
    cases = [(True, TypeError), (2.5, TypeError), ("3", TypeError), (None, TypeError), (0, ValueError)]
    for bad, exc in cases:
        with pytest.raises(exc, match="^n must be an integer"):
            checks.integer("n", bad, 1)
    with pytest.raises(ValueError, match=r"in \[1, 5\], got 6"):
        checks.integer("n", 6, 1, 5)


def test_number_bounds_nan_and_infinity():
    assert checks.number("w", 2) == 2.0 and checks.number("w", math.inf, 0, finite=False) == math.inf
    with pytest.raises(ValueError, match="w must be a finite number >= 0, got nan"):
        checks.number("w", float("nan"), 0)
    with pytest.raises(ValueError, match="w must be a finite number >= 0"):
        checks.number("w", math.inf, 0)
    with pytest.raises(ValueError, match=r"a number in \(0, 1\]"):
        checks.number("a", 0, 0, 1, lo_open=True)
    with pytest.raises(TypeError, match="w must be a real number"):
        checks.number("w", "2")


def test_seeds_lists_and_text():
    assert checks.seeds("s", range(3)) == [0, 1, 2]
    assert checks.seeds("s", [4, 4], distinct=False) == [4, 4]
    assert checks.parse_seeds("0-3,7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    for bad, exc, match in [
        ([], ValueError, "at least one"),
        ([1, 1], ValueError, "must not repeat"),
        ([2**63], ValueError, r"\[0, 2\*\*63\)"),
        ([-1], ValueError, r"\[0, 2\*\*63\)"),
        ([0.5], TypeError, "must be an integer"),
        ("0-3", TypeError, "string"),
    ]:
        with pytest.raises(exc, match=match):
            checks.seeds("s", bad)
    for text in ["", "3-1", "a", f"0-{checks.MAX_SEEDS}", f"{2**63}"]:
        with pytest.raises(ValueError, match="seeds"):
            checks.parse_seeds(text)


@given(st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=20, unique=True))
def test_parse_seeds_reads_back_its_text(seeds):
    text = ",".join(map(str, seeds))
    assert checks.parse_seeds(text) == seeds


def test_steps_interval_weights_and_device():
    assert checks.steps("steps", 32) == 32
    with pytest.raises(ValueError, match=rf"steps must be an integer in \[1, {checks.MAX_STEPS}\]"):
        checks.steps("steps", 0)
    assert checks.interval("interval", None) == (0.0, math.inf)
    assert checks.interval("interval", (0.3, 2)) == (0.3, 2.0)
    with pytest.raises(ValueError, match=r"interval\[1\]"):
        checks.interval("interval", (2, 1))
    with pytest.raises(TypeError, match="pair"):
        checks.interval("interval", 3)
    assert checks.weights("w", "1:2:0.5") == [1.0, 1.5, 2.0] and checks.weights("w", [2, 2, 3]) == [2.0, 3.0]
    with pytest.raises(ValueError, match="more than"):
        checks.parse_weights("0:10:0.001")
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        checks.parse_weights("-1,2")
    assert checks.device("d", "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="d must be a device"):
        checks.device("d", "gpu0")
    with pytest.raises(TypeError, match="d must be a device"):
        checks.device("d", 3.5)


def test_argparse_types_name_the_flag(capsys):
    p = argparse.ArgumentParser(prog="t", exit_on_error=False)
    p.add_argument("--steps", type=checks.arg(checks.steps))
    p.add_argument("--seeds", type=checks.arg(checks.parse_seeds))
    p.add_argument("--batch", type=checks.arg(checks.integer, 1))
    args = p.parse_args(["--steps", "8", "--seeds", "0-2", "--batch", "4"])
    assert (args.steps, args.seeds, args.batch) == (8, [0, 1, 2], 4)
    for flag, text, message in [
        ("--steps", "0", "must be an integer in [1,"),
        ("--steps", "many", "expected an integer, got 'many'"),
        ("--seeds", "5-1", "range '5-1' is empty"),
        ("--batch", "0", "must be an integer in [1, inf)"),
    ]:
        with pytest.raises(argparse.ArgumentError) as e:
            p.parse_args([flag, text])
        assert str(e.value).startswith(f"argument {flag}: ") and message in str(e.value)
