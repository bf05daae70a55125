"""The package's vocabulary of argument checks, used by the Python API and the command line alike:
integers and numbers in ranges, seeds, sampler steps, guidance weights and intervals. Each check
returns the value in its canonical type or raises ``ValueError`` / ``TypeError`` naming the
parameter and the bad value; the bounds live here and nowhere else.

On the command line :func:`arg` turns a check into an argparse ``type`` (text -> checked value),
so a flag's type and range are declared once, where it is parsed, and the handler trusts it.
"""

from __future__ import annotations

import argparse
import math
import operator
from collections.abc import Callable, Iterable

import torch

__all__ = [
    "MAX_SEED",
    "MAX_SEEDS",
    "MAX_STEPS",
    "MAX_WEIGHTS",
    "arg",
    "device",
    "integer",
    "interval",
    "number",
    "parse_seeds",
    "parse_weights",
    "seed",
    "seeds",
    "steps",
    "weights",
]

MAX_SEED = 2**63 - 1  # seeds are torch.Generator seeds (int64, non-negative)
MAX_SEEDS = 10_000_000  # seeds per call: each is one image
MAX_STEPS = 1_000_000  # sampler steps (the Rust core refuses more: schedule::MAX_STEPS)
MAX_WEIGHTS = 1000  # guidance weights per sweep: each one samples the whole seed set


def integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in ``[lo, hi]`` (either bound None: open). Booleans and floats are
    refused (``2.5`` or ``True`` is no count); numpy integers are accepted."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be an integer in {_span(lo, hi)}, got {v}")
    return v


def number(
    name: str,
    value,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``; either bound None:
    open); NaN is always refused, infinities unless ``finite=False``."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    low = lo is not None and (v <= lo if lo_open else v < lo)
    if math.isnan(v) or (finite and math.isinf(v)) or low or (hi is not None and v > hi):
        raise ValueError(f"{name} must be {_number_rule(lo, hi, lo_open, finite)}, got {value!r}")
    return v


def _number_rule(lo, hi, lo_open: bool, finite: bool) -> str:
    kind = "a finite number" if finite else "a number (not NaN)"
    if lo is not None and hi is not None:
        return f"a number in {_span(lo, hi, lo_open)}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {_fmt(lo)}"
    if hi is not None:
        return f"{kind} <= {_fmt(hi)}"
    return kind


def seed(name: str, value) -> int:
    """One seed: an integer in [0, 2**63)."""
    v = integer(name, value)
    if not 0 <= v <= MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**63), got {v}")
    return v


def seeds(name: str, value: Iterable[int], distinct: bool = True) -> list[int]:
    """``value`` as a list of seeds: integers in [0, 2**63), at least one, at most
    :data:`MAX_SEEDS`, and ``distinct`` (where each seed is one image)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of integers, got the string {value!r}")
    try:
        out = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of integers, got {type(value).__name__}") from None
    if not out:
        raise ValueError(f"{name} must name at least one seed")
    if len(out) > MAX_SEEDS:
        raise ValueError(f"{name} names {len(out)} seeds, more than {MAX_SEEDS}")
    out = [seed(name, s) for s in out]
    if distinct and len(set(out)) != len(out):
        raise ValueError(f"{name} must not repeat (each seed is one image)")
    return out


def parse_seeds(text: str, name: str = "seeds") -> list[int]:
    """``"0-9999"`` or ``"1,5,10-19"`` -> the list of seeds, checked as :func:`seeds` checks a
    list (sizes are checked before any list is built)."""
    ranges: list[tuple[int, int]] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            lo, _, hi = part.partition("-")
            lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
        except ValueError:
            raise ValueError(f"{name} must look like '0-99' or '1,5,7-9', got {text!r}") from None
        if lo_i > hi_i:
            raise ValueError(f"{name}: range {part!r} is empty")
        if not (0 <= lo_i and hi_i <= MAX_SEED):
            raise ValueError(f"{name} must be in [0, 2**63), got {part!r}")
        ranges.append((lo_i, hi_i))
    count = sum(hi - lo + 1 for lo, hi in ranges)
    if count == 0:
        raise ValueError(f"{name} must name at least one seed, got {text!r}")
    if count > MAX_SEEDS:
        raise ValueError(
            f"{name} names {count} seeds, more than {MAX_SEEDS}; split the work into several runs"
        )
    return seeds(f"{name} {text!r}", [s for lo, hi in ranges for s in range(lo, hi + 1)])


def device(name: str, value) -> torch.device:
    """A torch device (``"cpu"``, ``"cuda:1"``, a ``torch.device``)."""
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {value!r}")
    try:
        return torch.device(value)
    except RuntimeError:
        raise ValueError(f"{name} must be a device such as 'cpu' or 'cuda:0', got {value!r}") from None


def steps(name: str, value) -> int:
    """Sampler steps: an integer in [1, :data:`MAX_STEPS`]."""
    return integer(name, value, 1, MAX_STEPS)


def interval(name: str, value) -> tuple[float, float]:
    """A guidance interval ``(sigma_lo, sigma_hi)`` with ``0 <= lo <= hi`` (``hi`` may be inf);
    None means every noise level, ``(0, inf)``."""
    if value is None:
        return 0.0, math.inf
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be None or a pair (sigma_lo, sigma_hi), got {value!r}") from None
    if not (math.isfinite(lo) and lo >= 0):
        raise ValueError(f"{name}[0] (sigma_lo) must be finite and >= 0, got {lo}")
    if not hi >= lo:
        raise ValueError(f"{name}[1] (sigma_hi) must be >= {name}[0] = {lo}, got {hi}")
    return lo, hi


def weights(name: str, value) -> list[float]:
    """Guidance weights: a string for :func:`parse_weights` or a sequence of numbers, each finite
    and >= 0 (1 = no guidance); repeats dropped, order kept, at most :data:`MAX_WEIGHTS`."""
    if isinstance(value, str):
        return parse_weights(value, name)
    try:
        ws = [number(name, w, 0) for w in value]
    except TypeError:
        raise TypeError(f"{name} must be a string or a sequence of numbers, got {value!r}") from None
    return _distinct_weights(ws, name, value)


def parse_weights(spec: str, name: str = "weights") -> list[float]:
    """``"lo:hi:step"`` (``hi`` included when the steps reach it) or ``"w1,w2,..."`` -> the
    distinct guidance weights, in order (the grid's size is checked before it is built)."""
    text = str(spec)
    try:
        if ":" in text:
            lo, hi, step = (float(v) for v in text.split(":"))
        else:
            ws = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} must be 'lo:hi:step' or a comma list of numbers, got {text!r}") from None
    if ":" in text:
        if not all(math.isfinite(v) for v in (lo, hi, step)):
            raise ValueError(f"{name} {text!r}: lo, hi and step must be finite numbers")
        if step <= 0:
            raise ValueError(f"{name} {text!r}: step must be > 0, got {step:g}")
        if lo > hi:
            raise ValueError(f"{name} {text!r}: lo must be <= hi, got {lo:g} > {hi:g}")
        span = (hi - lo) / step  # may overflow to inf for a tiny step; the comparison still holds
        if not span < MAX_WEIGHTS:
            raise ValueError(
                f"{name} {text!r} makes more than {MAX_WEIGHTS} weights; use a larger step or a shorter range"
            )
        ws = [round(lo + i * step, 10) for i in range(math.floor(span + 1e-9) + 1)]
    for w in ws:
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(
                f"{name}: weights must be finite numbers >= 0 (1 = no guidance), got {w:g} in {text!r}"
            )
    return _distinct_weights(ws, name, text)


def _distinct_weights(ws: list[float], name: str, given) -> list[float]:
    if not ws:
        raise ValueError(f"{name} must name at least one weight, got {given!r}")
    ws = list(dict.fromkeys(ws))  # a repeated weight is one cell
    if len(ws) > MAX_WEIGHTS:
        raise ValueError(f"{name} {given!r} names {len(ws)} weights, more than {MAX_WEIGHTS}")
    return ws


def arg(check: Callable, *args, **kwargs):
    """An argparse ``type`` from a check or parser of this module: the text is converted (int for
    :func:`integer`, :func:`seed` and :func:`steps`, float for :func:`number`; the parsers
    :func:`parse_seeds` and :func:`parse_weights` take it as it is) and checked with ``args`` and
    ``kwargs`` (e.g. the bounds); errors become ``argparse.ArgumentTypeError``, which the parser
    reports with the flag's name."""
    parse = {number: float, integer: int, seed: int, steps: int}.get(check)

    def convert(text: str):
        try:
            if parse is None:  # a parser of text
                return check(text, "value", *args, **kwargs)
            try:
                value = parse(text)
            except ValueError:
                kind = "a number" if parse is float else "an integer"
                raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
            return check("value", value, *args, **kwargs)
        except (TypeError, ValueError) as e:
            text = str(e)
            for prefix in ("value: ", "value "):  # the parser names the flag
                text = text.removeprefix(prefix)
            raise argparse.ArgumentTypeError(text) from None

    convert.__name__ = getattr(check, "__name__", "value")  # argparse names the type in some errors
    return convert


def _span(lo, hi, lo_open: bool = False) -> str:
    left = "(-inf" if lo is None else f"{'(' if lo_open else '['}{_fmt(lo)}"
    right = "inf)" if hi is None else f"{_fmt(hi)}]"
    return f"{left}, {right}"


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"
