"""experiment.sweep_denoisers: guides x weights over in-memory denoisers (diffusers UNets here),
scored by the caller's metric, resumable; and the runnable diffusers example (--tiny)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402

from autoguide_fast import Autoguidance  # noqa: E402
from autoguide_fast.adapters.diffusers import denoiser  # noqa: E402
from autoguide_fast.generation import generate  # noqa: E402
from autoguide_fast.studies.sweep import sweep_denoisers  # noqa: E402
from test_diffusers_adapter import small_unet  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "diffusers_autoguidance.py"
SEEDS, STEPS = [0, 1, 2], 2


class Brightness:
    """A metric: distance of the mean pixel from 100 (and the mean itself); counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, classes):
        self.calls += 1
        mean = images.double().mean().item()
        return {"fd": abs(mean - 100.0), "mean": mean}


@pytest.fixture(scope="module")
def models():
    train = DDPMScheduler()
    main = denoiser(small_unet(0), train)
    return main, {"g1": denoiser(small_unet(1), train), "g2": denoiser(small_unet(2), train)}


def test_sweep_scores_every_cell_and_resumes(models, tmp_path):
    main, guides = models
    metric, lines = Brightness(), []
    best = sweep_denoisers(
        main,
        guides,
        "1.5,3",
        SEEDS,
        tmp_path / "sw",
        metric=metric,
        steps=STEPS,
        batch=2,
        identity={"main": "m0"},
        log=lines.append,
    )
    assert metric.calls == 4
    doc = json.loads((tmp_path / "sw" / "cells.json").read_text())
    cells = {(c["guide"], c["weight"]): c for c in doc["cells"].values()}
    assert set(cells) == {("g1", 1.5), ("g1", 3.0), ("g2", 1.5), ("g2", 3.0)}
    for (name, w), c in cells.items():  # the numbers of the cell's own images
        # The sweep's own batch: diffusers UNets round differently at other batch sizes on some
        # thread counts (one uint8 level; see test_diffusers_generate).
        images = torch.cat(
            [
                b.images
                for b in generate(
                    main, SEEDS, guidance=Autoguidance(guides[name], w), steps=STEPS, batch=2, device="cpu"
                )
            ]
        )
        assert c["mean"] == images.double().mean().item() and c["fd"] == abs(c["mean"] - 100)
        assert (tmp_path / "sw" / c["grid"]).is_file()
    assert best == min(cells.values(), key=lambda c: c["fd"])
    table = (tmp_path / "sw" / "table.md").read_text().splitlines()
    assert table[0] == "| guide | weight | fd | mean | grid |" and len(table) == 2 + 4
    for c in cells.values():
        assert f"| {c['guide']} | {c['weight']:g} | {c['fd']:.4g} | {c['mean']:.4g} | {c['grid']} |" in table
    for name in ("contact_sheet.png", "heatmap.png"):
        assert (tmp_path / "sw" / name).stat().st_size > 1000
    # Resume: only the new weight is computed; the cached cells come back as they were.
    again = sweep_denoisers(
        main,
        guides,
        "1.5,2,3",
        SEEDS,
        tmp_path / "sw",
        metric=metric,
        steps=STEPS,
        batch=3,
        identity={"main": "m0"},
        log=lines.append,
    )
    assert metric.calls == 6  # batch is not part of a cell's identity: images do not depend on it
    after = {
        (c["guide"], c["weight"]): c
        for c in json.loads((tmp_path / "sw" / "cells.json").read_text())["cells"].values()
    }
    assert len(after) == 6 and all(after[k] == c for k, c in cells.items())
    assert again["fd"] <= best["fd"]
    # Another identity (other checkpoints, other prompt) recomputes; maximize picks the other end.
    top = sweep_denoisers(
        main,
        guides,
        "1.5",
        SEEDS,
        tmp_path / "sw",
        metric=metric,
        steps=STEPS,
        identity={"main": "m1"},
        objective="mean",
        minimize=False,
        log=lines.append,
    )
    assert metric.calls == 8
    assert top["mean"] == max(c["mean"] for c in cells.values() if c["weight"] == 1.5)


def test_sweep_without_metric_writes_grids(models, tmp_path):
    main, guides = models
    assert (
        sweep_denoisers(main, {"g1": guides["g1"]}, [2.0], SEEDS, tmp_path, steps=STEPS, log=lambda _: None)
        is None
    )
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0] == "| guide | weight | grid |" and table[2].startswith("| g1 | 2 | grids/g1_w2_")
    assert (tmp_path / "contact_sheet.png").is_file() and not (tmp_path / "heatmap.png").exists()


def test_sweep_refuses_bad_arguments_before_creating_anything(models, tmp_path):
    main, guides = models
    out = tmp_path / "never"

    def refused(exc, match, **kw):
        args = dict(main=main, guides=guides, weights="2", seeds=SEEDS, out=out, steps=STEPS)
        with pytest.raises(exc, match=match):
            sweep_denoisers(**{**args, **kw})
        assert not out.exists()

    refused(ValueError, "guides: name 'a/b'", guides={"a/b": guides["g1"]})
    refused(TypeError, "guides must be a non-empty mapping", guides={})
    refused(TypeError, r"guides\['g'\] must be a denoiser", guides={"g": None})
    refused(ValueError, "weights.*-1", weights="2,-1")
    refused(ValueError, "seeds must not repeat", seeds=[1, 1])
    refused(ValueError, r"steps must be an integer in \[1, 1000000\], got 0", steps=0)
    refused(TypeError, "metric must be None or a callable", metric="fid")
    refused(TypeError, "identity must be JSON data", identity=object())
    refused(ValueError, "thumbnails must be a positive integer, got 0", thumbnails=0)
    refused(FileNotFoundError, "no config.json", vae=tmp_path / "novae")
    refused(ValueError, "class_idx must be None: the model is unconditional", class_idx=3)
    latent = denoiser(small_unet(3), DDPMScheduler(), latent=True)
    refused(ValueError, "makes VAE latents", main=latent)
    with pytest.raises(
        ValueError, match=r"objective 'fid' is not among the metric's values \['fd', 'mean'\]"
    ):
        sweep_denoisers(main, guides, "2", SEEDS, out, steps=STEPS, metric=Brightness(), objective="fid")


def test_example_runs_tiny(tmp_path):
    """The runnable recipe with tiny random models saved and loaded as real checkpoints, scored by
    a user metric given as MODULE:FUNCTION."""
    (tmp_path / "usermetric.py").write_text(
        "def score(images, classes):\n    return {'fd': float(images.double().std()), 'n': len(images)}\n"
    )
    out = tmp_path / "ex"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--tiny",
            "--out",
            str(out),
            "--seeds",
            "0-2",
            "--steps",
            "2",
            "--weights",
            "1.5,2.5",
            "--metric",
            "usermetric:score",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| guide | weight | fd | n | grid |"
    rows = [line.strip("| ").split(" | ") for line in table[2:]]
    assert sorted((r[0], r[1]) for r in rows) == [
        ("guide-early", "1.5"),
        ("guide-early", "2.5"),
        ("guide-small", "1.5"),
        ("guide-small", "2.5"),
    ]
    assert all(r[3] == "3" for r in rows)  # the metric saw every seed of each cell
    for r in rows:
        assert (out / r[-1]).is_file()
    best = min(rows, key=lambda r: float(r[2]))
    assert f"best: guide {best[0]}, weight {best[1]}" in proc.stdout
    for name in ("contact_sheet.png", "heatmap.png"):
        assert (out / name).stat().st_size > 1000
    assert len(json.loads((out / "cells.json").read_text())["cells"]) == 4
