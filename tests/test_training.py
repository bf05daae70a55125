"""Training loop: falling loss, snapshots, exact resume, signals, SIGKILL at random moments,
and torchrun with two CPU processes."""

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import autoguide_fast as ag
from autoguide_fast import AutoguideError, checkpoint, training
from autoguide_fast.data import load_dataset
from autoguide_fast.training import TrainOptions, learning_rate, train
from conftest import torchrun_cli

SMALL = dict(
    preset="digits-xs",
    batch=32,
    snapshot_kimg=0.128,
    checkpoint_kimg=0.128,
    log_kimg=0.064,
    rampup_kimg=0.1,
    lr_decay_kimg=0.2,
)


def opts(**kw):
    return TrainOptions(**{**SMALL, **kw})


def snapshot_tensors(out, nimg, std=0.05):
    return checkpoint.load(out / f"network-snapshot-{nimg:09d}-{std:.3f}.safetensors")


def test_train_writes_snapshots_and_the_loss_falls(tmp_path):
    result = train("digits", tmp_path, opts(kimg=0.512, ema_stds=(0.05, 0.1)), progress=False)
    assert result == dict(status="done", nimg=512, step=16, out=str(tmp_path))
    rows = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [r["nimg"] for r in rows] == [64 * i for i in range(1, 9)]
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    assert (tmp_path / "loss.png").stat().st_size > 5000
    meta = checkpoint.read_metadata(tmp_path / "network-snapshot-000000512-0.100.safetensors")
    assert (
        meta["nimg"] == "512"
        and float(meta["ema_std"]) == 0.1
        and json.loads(meta["dataset"])["name"] == "digits"
    )
    net = ag.load(tmp_path / "network-snapshot-000000512-0.050.safetensors")
    assert not net.training and net.label_dim == 10 and net.img_resolution == 8
    with torch.no_grad():
        assert net(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.eye(10)[:2]).shape == (2, 1, 8, 8)
    assert len(list(tmp_path.glob("training-state-*.safetensors"))) == 2  # the two newest are kept


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    train("digits", tmp_path / "a", opts(kimg=0.384), progress=False)
    train("digits", tmp_path / "b", opts(kimg=0.128), progress=False)
    lines = []
    result = train("digits", tmp_path / "b", opts(kimg=0.384), progress=False, log=lines.append)
    assert result["nimg"] == 384 and any("resuming" in x for x in lines)
    a, b = snapshot_tensors(tmp_path / "a", 384), snapshot_tensors(tmp_path / "b", 384)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    nimgs = [json.loads(x)["nimg"] for x in (tmp_path / "b" / "stats.jsonl").read_text().splitlines()]
    assert nimgs == sorted(set(nimgs))  # no duplicated lines after the resume


# Splitting a batch (accumulation rounds, processes) changes only the order of the floating-point
# sums, and Adam (dividing by sqrt(v) + eps) amplifies those rounding differences: in float32 the
# weights after 4 steps differ by up to 1.6e-5 (1.8e-5 on some CPUs), in float64 by 3.3e-14, the
# ratio of the unit roundoffs (2**29). So these runs use float64, and ATOL_FP64 is 3000x above the
# float64 level, while a wrong split (a sample dropped or drawn twice, a loss scaled per round, a
# weight normalised once per round instead of once per step) moves the weights by >= 1e-7.
ATOL_FP64 = 1e-10


def assert_same_run(a_dir, b_dir, nimg):
    a, b = snapshot_tensors(a_dir, nimg), snapshot_tensors(b_dir, nimg)
    assert a.keys() == b.keys() and all(v.dtype == torch.float64 for v in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL_FP64)
    rows = [[json.loads(x) for x in (d / "stats.jsonl").read_text().splitlines()] for d in (a_dir, b_dir)]
    assert [r["nimg"] for r in rows[0]] == [r["nimg"] for r in rows[1]]
    for ra, rb in zip(*rows):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-12)


def test_batch_gpu_accumulation_matches_one_round(tmp_path):
    train("digits", tmp_path / "a", opts(kimg=0.128, precision="fp64"), progress=False)
    train("digits", tmp_path / "b", opts(kimg=0.128, batch_gpu=8, precision="fp64"), progress=False)
    assert_same_run(tmp_path / "a", tmp_path / "b", 128)


def test_unconditional_and_bad_options(tmp_path):
    train("digits", tmp_path / "u", opts(kimg=0.064, cond=False), progress=False)
    assert ag.load(tmp_path / "u" / "network-snapshot-000000064-0.050.safetensors").label_dim == 0
    with pytest.raises(ValueError, match="preset must be one of"):
        train("digits", tmp_path / "x", opts(preset="huge"), progress=False)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        train("digits", tmp_path / "x", opts(batch=0), progress=False)
    with pytest.raises(ValueError, match="holds a run of another network"):
        train("digits", tmp_path / "u", opts(kimg=0.128, cond=True), progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out must be a directory"):
        train("digits", tmp_path / "file", opts(), progress=False)


def test_checkpoints_before_the_first_stats_line_and_divergence(tmp_path):
    # A checkpoint interval shorter than the stats interval used to crash (no stats.jsonl yet).
    result = train(
        "digits", tmp_path / "c", opts(kimg=0.064, checkpoint_kimg=0.032, log_kimg=1.0), progress=False
    )
    assert result["status"] == "done" and (tmp_path / "c" / "loss.png").exists()
    # A diverging run stops after max_nonfinite NaN/inf steps in a row with an error naming the
    # step; nothing non-finite is written.
    with pytest.raises(AutoguideError, match="training diverged: the loss was NaN/inf for 3 steps in a row"):
        train(
            "digits",
            tmp_path / "d",
            opts(kimg=0.256, lr=1e30, rampup_kimg=0, checkpoint_kimg=0.032, max_nonfinite=3),
            progress=False,
        )
    for f in (tmp_path / "d").glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in checkpoint.load(f).values() if t.is_floating_point()), f
    stats = tmp_path / "d" / "stats.jsonl"
    for line in stats.read_text().splitlines() if stats.exists() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-finite value {c} in stats.jsonl"))


def test_a_transient_nonfinite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    # As the official loop: a NaN loss zeroes the step's non-finite gradients and training goes on;
    # stats.jsonl counts it. Here the 2nd loss evaluation of 4 steps returns NaN.
    from autoguide_fast import training

    calls = []
    real = training.edm2_loss

    def flaky(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(training.loop, "edm2_loss", flaky)  # the name the loop calls
    result = train("digits", tmp_path, opts(kimg=0.128, log_kimg=1.0), progress=False)
    assert result["status"] == "done" and len(calls) == 4
    [row] = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert row["nonfinite_steps"] == 1 and math.isfinite(row["loss"]) and row["sec_per_kimg"] > 0
    for t in checkpoint.load(tmp_path / "network-snapshot-000000128-0.050.safetensors").values():
        assert torch.isfinite(t).all()


def test_official_presets_bring_their_training_settings():
    # NVlabs/edm2 train_edm2.py: edm2-img512-s lr 0.0100, decay 70000 batches of 2048, dropout 0,
    # 2048 << 20 images, P_mean -0.4, P_std 1.0; img64-m lr 0.0090, decay 35000, dropout 0.1.
    s = training.preset_defaults("edm2-img512-s")
    assert s == dict(
        lr=0.01,
        lr_decay_kimg=143360.0,
        rampup_kimg=10000.0,
        dropout=0.0,
        kimg=2147483.648,
        batch=2048,
        P_mean=-0.4,
        P_std=1.0,
    )
    m = training.preset_defaults("edm2-img64-m")
    assert (m["lr"], m["lr_decay_kimg"], m["dropout"], m["P_mean"], m["P_std"]) == (
        0.009,
        71680.0,
        0.1,
        -0.8,
        1.6,
    )
    assert training.preset_defaults("digits-s") == {}
    assert TrainOptions(preset="edm2-img512-xs").snapshot_torch_dtype() == torch.float16
    assert TrainOptions(preset="digits-s").snapshot_torch_dtype() is None


def test_options_are_validated():
    assert learning_rate(10_000, 0.01, 0, 0) == 0.01  # lr_decay_kimg 0: no decay, as documented
    train_opts = TrainOptions(lr_decay_kimg=0)
    train_opts.validate()
    for kw, match in [
        (dict(rampup_kimg=-5), "rampup_kimg must be a number >= 0"),
        (dict(rampup_kimg=float("nan")), "rampup_kimg must be"),
        (dict(ema_stds=(0.05, 0.05)), "ema_stds must be distinct"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(checkpoint_kimg=0), "checkpoint_kimg must be a positive number"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainOptions(**kw).validate()


def _cli(out, kimg, extra=()):
    args = [
        "train",
        "--data",
        "digits",
        "--preset",
        "digits-xs",
        "--out",
        str(out),
        "--kimg",
        str(kimg),
        "--batch",
        "32",
        "--snapshot-kimg",
        "0.064",
        "--log-kimg",
        "0.032",
        "--rampup-kimg",
        "0.1",
        "--lr-decay-kimg",
        "0.2",
        "--no-progress",
        *extra,
    ]
    return [sys.executable, "-m", "autoguide_fast.cli", *args]


def test_sigterm_writes_a_checkpoint_and_resumes(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out, 50), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not list(out.glob("training-state-*.safetensors")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, output
    assert "stopped by signal" in output
    newest = sorted(out.glob("training-state-*.safetensors"))[-1]
    stopped_at = int(checkpoint.read_metadata(newest)["nimg"])
    assert 64 <= stopped_at < 50_000
    done = subprocess.run(_cli(out, stopped_at / 1000 + 0.064), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming from {newest}" in done.stdout


def test_sigkill_at_random_moments_never_corrupts_and_resume_is_exact(tmp_path):
    rng = random.Random(1234)
    out, ref = tmp_path / "killed", tmp_path / "ref"
    kimg = 0.384
    for _ in range(3):
        proc = subprocess.Popen(_cli(out, kimg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))
        proc.kill()
        proc.wait()
        for f in out.glob("*.safetensors"):  # every visible file is whole
            checkpoint.open(f).close()
    subprocess.run(_cli(out, kimg), check=True, capture_output=True, timeout=300)
    subprocess.run(_cli(ref, kimg), check=True, capture_output=True, timeout=300)
    a, b = snapshot_tensors(out, 384), snapshot_tensors(ref, 384)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not list(out.glob(".*.tmp"))


def test_torchrun_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        *torchrun_cli(),
        *_cli(tmp_path / "ddp", 0.128)[3:],
    ]
    ran = subprocess.run([*cmd, "--precision", "fp64"], capture_output=True, text=True, timeout=600, env=env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    one = [*_cli(tmp_path / "one", 0.128), "--precision", "fp64"]
    subprocess.run(one, check=True, capture_output=True, timeout=300, env=env)
    assert_same_run(tmp_path / "ddp", tmp_path / "one", 128)


def _png_folder(root, sizes, labels=None):
    from PIL import Image

    root.mkdir()
    for i, s in enumerate(sizes):
        Image.fromarray(np.full((s, s, 3), i * 20, np.uint8)).save(root / f"img{i:03d}.png")
    if labels is not None:
        (root / "dataset.json").write_text(
            json.dumps({"labels": [[f"img{i:03d}.png", c] for i, c in enumerate(labels)]})
        )
    return root


def test_datasets(tmp_path):
    d = load_dataset("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.uint8 and d.num_classes == 10
    x, y = d.batch(torch.arange(4))
    assert x.min() >= -1 and x.max() <= 1 and y.shape == (4, 10)
    folder = _png_folder(tmp_path / "f", [4] * 5, labels=[0, 1, 2, 1, 0])
    f = load_dataset(folder)
    assert f.images.shape == (5, 3, 4, 4) and f.labels.tolist() == [0, 1, 2, 1, 0] and f.num_classes == 3
    with zipfile.ZipFile(tmp_path / "f.zip", "w") as z:
        for p in folder.iterdir():
            z.write(p, p.name)
    z = load_dataset(tmp_path / "f.zip")
    assert torch.equal(z.images, f.images) and torch.equal(z.labels, f.labels)
    np.savez(tmp_path / "a.npz", images=np.zeros((6, 4, 4, 3), np.uint8), labels=np.arange(6) % 2)
    n = load_dataset(tmp_path / "a.npz")
    assert n.images.shape == (6, 3, 4, 4) and n.num_classes == 2
    with pytest.raises(FileNotFoundError, match="data set not found"):
        load_dataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="same size"):
        load_dataset(_png_folder(tmp_path / "mixed", [4, 4, 8]))
    with pytest.raises(ValueError, match="no label for"):
        load_dataset(_png_folder(tmp_path / "partial", [4, 4, 4], labels=[0, 1]))
    np.savez(tmp_path / "bad.npz", images=np.zeros((6, 4, 4), np.uint8), labels=np.arange(5))
    with pytest.raises(ValueError, match="labels must be"):
        load_dataset(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="has no labels"):
        train(_png_folder(tmp_path / "nolabels", [8] * 4), tmp_path / "o", opts(), progress=False)


def test_streamed_training_equals_in_memory(tmp_path):
    # The same run from a zip streamed by 2 DataLoader workers and from memory: the images of
    # every step are the same (indices from the per-step streams), so the snapshots are identical.
    from PIL import Image

    d = load_dataset("digits")
    with zipfile.ZipFile(tmp_path / "digits.zip", "w") as z:
        names = []
        for i in range(300):
            buf = io.BytesIO()
            Image.fromarray(d.images[i, 0].numpy()).save(buf, "PNG")
            names.append(f"{i // 100:05d}/img{i:08d}.png")
            z.writestr(names[-1], buf.getvalue())
        z.writestr(
            "dataset.json", json.dumps({"labels": [[n, int(c)] for n, c in zip(names, d.labels[:300])]})
        )
    o = opts(kimg=0.096)
    a = train(tmp_path / "digits.zip", tmp_path / "mem", o, progress=False, stream=False)
    b = train(tmp_path / "digits.zip", tmp_path / "str", o, progress=False, stream=True, workers=2)
    assert a["nimg"] == b["nimg"] == 96
    sa, sb = snapshot_tensors(tmp_path / "mem", 96), snapshot_tensors(tmp_path / "str", 96)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_latent_training_records_the_official_encoder(tmp_path):
    # A data set in the official latent layout (per image float32 [2C, H, W] = posterior mean and
    # std in .npy files): the run trains on (mean + eps * std) * scale + bias, and its snapshots
    # carry the same encoder as the official latent checkpoints, so generate --vae decodes them.
    from autoguide_fast.interop import official

    rng = np.random.default_rng(0)
    with zipfile.ZipFile(tmp_path / "latents.zip", "w") as z:
        names = []
        for i in range(40):
            mean = rng.normal([5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28], (8, 8, 4)).transpose(
                2, 0, 1
            )
            arr = np.concatenate([mean, rng.uniform(0.05, 0.2, (4, 8, 8))]).astype(np.float32)
            buf = io.BytesIO()
            np.save(buf, arr)
            names.append(f"00000/img-mean-std-{i:08d}.npy")
            z.writestr(names[-1], buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": [[n, i % 10] for i, n in enumerate(names)]}))
    train(tmp_path / "latents.zip", tmp_path / "run", opts(kimg=0.064), progress=False, workers=0)
    snap = tmp_path / "run" / "network-snapshot-000000064-0.050.safetensors"
    net = ag.load(snap)
    assert (net.img_channels, net.img_resolution, net.label_dim) == (4, 8, 10)
    want = official.read(Path(__file__).parent / "data" / "edm2" / "official" / "latent-main.pkl").encoder
    assert net.encoder == want  # kind, VAE name, per-channel scale and bias as the official encoder
    from autoguide_fast.cli import main

    vae = Path(__file__).parent / "data" / "edm2" / "official" / "tiny-vae"
    assert (
        main(
            [
                "generate",
                "--net",
                str(snap),
                "--seeds",
                "0-1",
                "--steps",
                "2",
                "--vae",
                str(vae),
                "--out",
                str(tmp_path / "imgs"),
                "--no-progress",
            ]
        )
        == 0
    )
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "imgs" / "000000.png")).shape == (32, 32, 3)
