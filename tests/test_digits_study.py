"""The digits study over training seeds (digits_study.digits_seeds) at a tiny size: its search is
the sweep tool's, its check re-evaluates the same cells on every training set and two seed sets,
and everything it reports is derived from the cached evaluations."""

import json

import numpy as np
import pytest

from autoguide_fast.studies.digits_study import DigitsStudy, digits_seeds

# Batches of 128 images: the guide run has snapshots at 128 and 256 images.
TINY = DigitsStudy(
    main_kimg=0.256,
    guide_presets=("digits-xxs",),
    guide_kimg=(0.128, 0.256),
    guide_snapshot_kimg=0.128,
    ema_guide=(0.1,),
    weights=(2.0,),
    samples=24,
    steps=3,
)


def test_digits_seeds_tiny(tmp_path):
    lines = []
    s = digits_seeds(tmp_path, seeds=2, study=TINY, log=lines.append)
    assert {"study.json", "study.md", "study.png", "evaluations.json"} <= {p.name for p in tmp_path.iterdir()}
    assert [len(t["fd_a"]) for t in s["check"].values()] == [2, 2, 2, 2]
    assert list(s["check"]) == ["none", "autoguidance", "cfg", "cfg_interval"]
    # The search is the sweep tool's: one cell per guide length, the best one is checked.
    cells = s["search"]["autoguidance"]
    assert sorted(c["guide_kimg"] for c in cells) == [0.128, 0.256]
    best = s["best"]["autoguidance"]
    assert best["fd"] == min(c["fd"] for c in cells)
    assert s["check"]["autoguidance"]["guide"] == dict(
        guide="digits-xxs", ema_guide=0.10, guide_kimg=best["guide_kimg"]
    )
    # The check evaluates the same models on set 0 with the same seeds: the sweep's number again.
    assert s["check"]["autoguidance"]["fd_a"][0] == pytest.approx(best["fd"], rel=1e-9)
    # Differences are paired by training set and seed set.
    ag = s["check"]["autoguidance"]
    for m in ("none", "cfg", "cfg_interval"):
        t = s["check"][m]
        want = np.array(t["fd_a"] + t["fd_b"]) - np.array(ag["fd_a"] + ag["fd_b"])
        np.testing.assert_allclose(s["diffs"][m], want, rtol=0, atol=1e-12)
    # Seed sets A and B are disjoint, so the same models measure differently on them.
    assert s["check"]["none"]["fd_a"] != s["check"]["none"]["fd_b"]
    noise = [abs(a - b) / np.sqrt(2) for t in s["check"].values() for a, b in zip(t["fd_a"], t["fd_b"])]
    assert s["sampling_noise"] == pytest.approx(np.sqrt(np.mean(np.square(noise))), rel=1e-12)
    assert "| autoguidance | 2 | digits-xxs" in (tmp_path / "study.md").read_text()
    # A second run trains nothing and reuses every sweep cell and evaluation.
    evaluations = json.loads((tmp_path / "evaluations.json").read_text())
    lines.clear()
    again = digits_seeds(tmp_path, seeds=2, study=TINY, log=lines.append)
    assert again["check"] == s["check"]
    assert not any(line.startswith("main=") for line in lines)  # the sweep's per-cell lines
    assert json.loads((tmp_path / "evaluations.json").read_text()) == evaluations


def test_digits_seeds_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="seeds must be an integer in"):
        digits_seeds(tmp_path / "x", seeds=0, study=TINY)
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(ValueError, match="out must be a directory"):
        digits_seeds(f, study=TINY)
    assert not (tmp_path / "x").exists()
