"""Generation, metrics and the digits tools."""

import json
import os
import subprocess

import numpy as np
import pytest
import torch
from scipy import linalg

import autoguide_fast as ag
from autoguide_fast.checks import parse_seeds
from autoguide_fast.cli import main
from autoguide_fast.generation import compact_seeds, generate
from autoguide_fast.metrics import feature_stats, frechet_distance
from autoguide_fast.networks import PRESETS, Precond
from autoguide_fast.studies import digits
from conftest import torchrun_cli


def tiny(tmp_path, name="net", seed=0, **kw):
    torch.manual_seed(seed)
    net = Precond(**{**PRESETS["digits-xs"], **kw}).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.5)  # non-zero gains so that outputs depend on every weight
    path = tmp_path / f"{name}.safetensors"
    ag.save(net, path, nimg=1000, ema_std=0.1)
    return ag.load(path), path


def test_parse_seeds():
    assert parse_seeds("0-3,7,9-10") == [0, 1, 2, 3, 7, 9, 10]
    assert compact_seeds([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    for bad in ("", "5-2", "a-b", "-1"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)


def test_images_depend_only_on_seeds(tmp_path):
    net, _ = tiny(tmp_path)
    guide, _ = tiny(tmp_path, "guide", seed=1)
    g = ag.Autoguidance(guide, 2.0)
    big = list(generate(net, range(10), guidance=g, batch=10, steps=4, device="cpu"))
    small = list(generate(net, range(10), guidance=g, batch=3, steps=4, device="cpu"))
    assert torch.equal(big[0].images, torch.cat([b.images for b in small]))
    assert torch.equal(big[0].classes, torch.cat([b.classes for b in small]))
    assert big[0].images.dtype == torch.uint8 and big[0].images.shape == (10, 1, 8, 8)
    fixed = next(generate(net, range(4), class_idx=3, steps=4, device="cpu"))
    assert fixed.classes.tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="class_idx must be an integer in"):
        next(generate(net, range(4), class_idx=10, steps=4, device="cpu"))


def test_incompatible_guides_are_refused_before_sampling(tmp_path):
    net, _ = tiny(tmp_path)
    other, _ = tiny(tmp_path, "other", img_resolution=16)
    with pytest.raises(ValueError, match=r"the guide makes \(1, 16, 16\)"):
        next(generate(net, range(2), guidance=ag.Autoguidance(other, 2.0)))
    uncond, _ = tiny(tmp_path, "uncond", label_dim=0)
    next(generate(net, range(2), guidance=ag.CFG(uncond, 2.0), steps=2))  # CFG guides have no labels
    with pytest.raises(ValueError, match="label_dim 0"):
        next(generate(net, range(2), guidance=ag.Autoguidance(uncond, 2.0)))


def test_combined_guidance_interpolates_between_autoguidance_and_cfg():
    def const(v):
        return lambda x, sigma, labels=None: torch.full_like(x, v)

    x, s = torch.zeros(2, 3), torch.ones(2)
    main_d, guide_d, uncond_d = const(1.0), const(0.25), const(-1.0)
    for alpha, want in ((0.0, ag.Autoguidance(guide_d, 3.0)), (1.0, ag.CFG(uncond_d, 3.0))):
        c = ag.Combined(guide_d, uncond_d, 3.0, alpha=alpha)
        torch.testing.assert_close(c(main_d, x, s, None, True), want(main_d, x, s, None, True))
    half = ag.Combined(guide_d, uncond_d, 3.0, alpha=0.5)(main_d, x, s, None, True)
    torch.testing.assert_close(half, torch.full_like(x, 1.0 + 2.0 * (0.5 * 0.75 + 0.5 * 2.0)))
    with pytest.raises(ValueError, match="alpha must be"):
        ag.Combined(guide_d, uncond_d, 2.0, alpha=1.5)


def test_frechet_distance_closed_form_and_scipy():
    # 1D: (m1 - m2)^2 + (s1 - s2)^2.
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, abs=1e-12)
    # Diagonal: sum over dimensions.
    d1, d2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = 1.0 + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance([0, 0, 1], np.diag(d1), [0, 0, 0], np.diag(d2)) == pytest.approx(want, abs=1e-12)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 0.5
    (m1, c1), (m2, c2) = feature_stats(torch.tensor(a)), feature_stats(torch.tensor(b))
    covmean = linalg.sqrtm(c1 @ c2).real
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(m1, c1, m1, c1) == pytest.approx(0.0, abs=1e-9)


def test_shipped_classifier_and_its_training():
    (_, _), (xte, yte) = digits._split()
    with torch.no_grad():
        acc = float((digits.load_classifier()(xte).argmax(1) == yte).float().mean())
    assert acc >= 0.96
    _, retrained = digits.train_classifier(epochs=10)
    assert retrained >= 0.93


def test_digits_metrics_on_real_and_noise():
    from autoguide_fast.data import load_dataset

    d = load_dataset("digits")
    real = digits.evaluate(d.images, d.labels)
    assert real["fd"] == pytest.approx(0.0, abs=1e-4) and real["alignment"] > 0.97
    assert real["precision"] == 1.0 and real["recall"] == 1.0
    noise = torch.randint(
        0, 256, (500, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    bad = digits.evaluate(noise, torch.zeros(500, dtype=torch.long))
    assert bad["fd"] > 100 and bad["precision"] < 0.5
    with pytest.raises(ValueError, match="uint8"):
        digits.evaluate(torch.zeros(2, 3, 8, 8))


def test_cli_generate_and_eval(tmp_path, capsys):
    _, net = tiny(tmp_path)
    _, guide = tiny(tmp_path, "guide", seed=1)
    out = tmp_path / "imgs"
    args = [
        "generate",
        "--net",
        str(net),
        "--guide",
        str(guide),
        "--weight",
        "2",
        "--seeds",
        "0-19",
        "--batch",
        "7",
        "--steps",
        "4",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert len(list(out.glob("0000*.png"))) == 20 and (tmp_path / "imgs-grid.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seeds"] == "0-19" and manifest["guidance"]["kind"] == "Autoguidance"
    assert main(args[:-3] + ["--out", str(tmp_path / "a.npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "a.npz") as z:
        assert z["images"].shape == (20, 8, 8, 1) and z["labels"].shape == (20,)
    capsys.readouterr()
    assert main(["eval", "--images", str(out), "--out", str(tmp_path / "m.json")]) == 0
    m = json.loads((tmp_path / "m.json").read_text())
    assert set(m) == {"fd", "precision", "recall", "alignment"}
    capsys.readouterr()
    assert main(["eval", "--images", str(tmp_path / "a.npz")]) == 0
    assert json.loads(capsys.readouterr().out)["fd"] == pytest.approx(m["fd"], rel=1e-9)
    # Bad input fails before sampling, with exit code 2.
    (tmp_path / "file").write_text("x")
    assert main(args[:-3] + ["--out", str(tmp_path / "file")]) == 2
    assert main(["generate", "--net", str(tmp_path / "missing.safetensors"), "--out", str(out)]) == 2
    assert main(["generate", "--net", str(net), "--seeds", "5-1", "--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err


def test_torchrun_generation_matches_one_process(tmp_path):
    _, net = tiny(tmp_path)
    common = [
        "generate",
        "--net",
        str(net),
        "--seeds",
        "0-9",
        "--batch",
        "4",
        "--steps",
        "3",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        *torchrun_cli(),
        *common,
        "--out",
        str(tmp_path / "ddp"),
    ]
    ran = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    for seed in range(10):
        a = (tmp_path / "ddp" / f"{seed:06d}.png").read_bytes()
        assert a == (tmp_path / "one" / f"{seed:06d}.png").read_bytes()
    # Each rank made its share of the official split (batches of <= 4 dealt round-robin over 2
    # ranks: 0-2, 6-7 and 3-5, 8-9): disjoint, all seeds together, nothing else in the folder.
    shares = json.loads((tmp_path / "ddp" / "manifest.json").read_text())["ranks"]
    assert shares == ["0-2,6-7", "3-5,8-9"]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [f"{s:06d}.png" for s in range(10)] + [
        "manifest.json"
    ]


def test_sweep_over_guide_training_lengths(tmp_path):
    # One guide run gives every training length: each cell's guide is the run reconstructed post
    # hoc at the snapshot nearest to the asked length.
    from autoguide_fast.ema import list_snapshots, reconstruct
    from autoguide_fast.studies.sweep import evaluate_guidance, sweep
    from autoguide_fast.training import TrainOptions, train

    _, net = tiny(tmp_path)
    opts = TrainOptions(
        preset="digits-xs",
        kimg=0.096,
        batch=32,
        snapshot_kimg=0.032,
        checkpoint_kimg=0.096,
        log_kimg=0.032,
        lr_decay_kimg=0.064,
        rampup_kimg=0,
        ema_stds=(0.05, 0.1),
    )
    train("digits", tmp_path / "g", opts, progress=False, log=lambda _: None)
    assert sorted({s.nimg for s in list_snapshots(tmp_path / "g")}) == [32, 64, 96]
    lines = []
    sweep(
        net,
        tmp_path / "g",
        "2.0",
        tmp_path / "sw",
        ema_guide=[0.10],
        guide_kimg=[0.04, 0.096, 0.1],
        seeds=range(20),
        steps=3,
        log=lines.append,
    )
    cells = json.loads((tmp_path / "sw" / "cells.json").read_text())["cells"].values()
    assert sorted(c["guide_kimg"] for c in cells) == [0.032, 0.096]  # 0.1 and 0.096 are one time
    assert "| 0.032 | 2 |" in (tmp_path / "sw" / "table.md").read_text()
    (early,) = [c for c in cells if c["guide_kimg"] == 0.032]
    ref_guide = reconstruct(tmp_path / "g", [0.10], 32, out_dir=tmp_path / "ref", progress=False)[0]
    classifier = digits.load_classifier()
    m, _ = evaluate_guidance(
        ag.load(net),
        ag.Autoguidance(ag.load(ref_guide), 2.0),
        list(range(20)),
        3,
        digits.reference_stats(classifier),
        classifier,
    )
    assert early["fd"] == pytest.approx(m["fd"], rel=1e-12)
    with pytest.raises(ValueError, match="no snapshot near 0.01 kimg"):
        sweep(net, tmp_path / "g", "2.0", tmp_path / "x", ema_guide=[0.10], guide_kimg=[0.01])
    with pytest.raises(ValueError, match="needs a guide run directory"):
        sweep(net, net, "2.0", tmp_path / "x", guide_kimg=[0.05])
    assert not (tmp_path / "x").exists()


def test_sweep_is_resumable(tmp_path):
    from autoguide_fast.studies.sweep import sweep

    _, net = tiny(tmp_path)
    _, guide = tiny(tmp_path, "guide", seed=1)
    lines = []
    best = sweep(net, guide, "1.5,2.0", tmp_path / "sw", seeds=range(20), steps=3, log=lines.append)
    assert best["weight"] in (1.5, 2.0) and sum("fd=" in x for x in lines) == 2
    assert (tmp_path / "sw" / "heatmap.png").is_file() and "| 2 |" in (
        tmp_path / "sw" / "table.md"
    ).read_text()
    lines.clear()
    again = sweep(net, guide, "1.5,2.0,2.5", tmp_path / "sw", seeds=range(20), steps=3, log=lines.append)
    assert sum("fd=" in x for x in lines) == 1  # only the new weight was evaluated
    assert again["fd"] <= best["fd"]
