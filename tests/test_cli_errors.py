"""The CLI's error discipline on bad inputs (generate, ema, convert, train, the API under them):
one line ``autoguide <command>: error: ...`` naming the culprit, exit 2 (1 for a bug, 130 for
Ctrl-C), no traceback, nothing created or left half-written."""

import json
import os
import subprocess
import sys

import pytest
import torch

import autoguide_fast as ag
from autoguide_fast import AutoguideError, checkpoint, cli
from autoguide_fast.cli import generate as cli_generate
from autoguide_fast.networks.edm2 import PRESETS, Precond
from autoguide_fast.networks.toy import ToyModel


def run(capsys, *args):
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:  # a flag's value refused by the parser itself (checks.arg types)
        code = e.code
    err = capsys.readouterr().err
    return code, err


def tiny(tmp_path, name="net", **kw):
    torch.manual_seed(0)
    net = Precond(**{**PRESETS["digits-xs"], **kw}).eval()
    path = tmp_path / f"{name}.safetensors"
    ag.save(net, path)
    return path


@pytest.fixture
def models(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    ag.save(ToyModel(num_layers=2, hidden_dim=8), tmp_path / "toy.safetensors")
    net = tiny(tmp_path)
    uncond_cond = tiny(tmp_path, "cond_as_cfg")
    state = checkpoint.load(net)
    bad = dict(state)
    bad["unet.out_conv.weight"] = torch.zeros(3, 3)
    checkpoint.save(bad, tmp_path / "shapes.safetensors", checkpoint.read_metadata(net))
    nan = {k: v.clone() for k, v in state.items()}
    nan["unet.out_conv.weight"][0, 0, 0, 0] = float("nan")
    checkpoint.save(nan, tmp_path / "nan.safetensors", checkpoint.read_metadata(net))
    os.mkfifo(tmp_path / "fifo.safetensors")
    (tmp_path / "afile").write_text("x")
    return dict(net=net, cond=uncond_cond, dir=tmp_path)


GENERATE_CASES = [
    # (extra arguments, text the message must hold)
    (["--net", "{dir}/empty.safetensors"], "empty.safetensors"),
    (["--net", "{dir}"], "is a directory"),
    (["--net", "{dir}/missing.safetensors"], "missing.safetensors"),
    (["--net", "{dir}/fifo.safetensors"], "not a regular file"),
    (["--net", "{dir}/toy.safetensors"], "image model"),
    (["--net", "{dir}/shapes.safetensors"], "shapes.safetensors"),
    (["--net", "{dir}/nan.safetensors"], "non-finite"),
    (["--net", "{net}", "--out", "{dir}/afile/sub"], "afile"),
    (["--net", "{net}", "--guide", "{net}", "--interval", "a,b"], "a,b"),
    (["--net", "{net}", "--seeds", "0-99999999999"], "more than"),
    (["--net", "{net}", "--seeds", "1,1"], "must not repeat"),
    (["--net", "{net}", "--seeds", "-1"], "seeds"),
    (["--net", "{net}", "--steps", "1000000000000"], "steps"),
    (["--net", "{net}", "--weight", "2"], "--weight need a guide"),
    (["--net", "{net}", "--interval", "0.1,1"], "--interval need a guide"),
    (["--net", "{net}", "--guide", "{net}", "--alpha", "0.3"], "--alpha"),
    (["--net", "{net}", "--guide", "{net}", "--weight", "-2"], "weight must be"),
    (["--net", "{net}", "--cfg", "{cond}", "--weight", "2"], "must be unconditional"),
    (["--net", "{net}", "--class", "10"], "class_idx"),
    (["--net", "{net}", "--batch", "0"], "batch"),
    (["--preset", "no-such-preset", "--models", "{dir}"], "no-such-preset"),
    (["--seeds", "0"], "--net"),
]


@pytest.mark.parametrize(("extra", "culprit"), GENERATE_CASES, ids=[c[1] for c in GENERATE_CASES])
def test_generate_bad_inputs(models, capsys, extra, culprit):
    out = models["dir"] / "out"
    args = [a.format(**models) for a in extra]
    if "--out" not in args:
        args += ["--out", str(out)]
    code, err = run(capsys, "generate", "--no-progress", *args)
    assert code == 2, err
    assert err.startswith("autoguide generate: error: ") and err.count("\n") == 1, err
    assert culprit in err
    assert not out.exists()  # validated before anything was created


def test_ema_bad_inputs(tmp_path, capsys):
    from autoguide_fast.training import TrainOptions, train

    small = dict(
        preset="digits-xs",
        kimg=0.064,
        batch=32,
        snapshot_kimg=0.032,
        checkpoint_kimg=0.064,
        log_kimg=0.064,
        rampup_kimg=0.1,
    )
    train("digits", tmp_path / "a", TrainOptions(**small), progress=False)
    train("digits", tmp_path / "b", TrainOptions(**small, seed=1), progress=False)
    code, err = run(capsys, "ema", "--snapshots", tmp_path / "a", "--std", "0.07", "--out", tmp_path / "a")
    assert code == 2 and "must not be the snapshots' directory" in err
    # Two runs of the same preset mixed in one folder.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "x-000000032-0.050.safetensors").write_bytes(
        (tmp_path / "a" / "network-snapshot-000000032-0.050.safetensors").read_bytes()
    )
    (mixed / "y-000000064-0.100.safetensors").write_bytes(
        (tmp_path / "b" / "network-snapshot-000000064-0.100.safetensors").read_bytes()
    )
    code, err = run(capsys, "ema", "--snapshots", mixed, "--std", "0.07", "--out", tmp_path / "o")
    assert code == 2 and "different training runs" in err and not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="prefix must be a plain file-name prefix"):
        ag.ema.reconstruct(
            tmp_path / "a", 0.07, out_dir=tmp_path / "o", prefix="../../escape", progress=False
        )
    # Temporaries of a writer that was killed are removed by the next run; a live one's stay.
    out = tmp_path / "phema"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = out / f".phema-000000064-0.070.safetensors.{int(dead.stdout)}.tmp"
    live = out / f".other.safetensors.{os.getpid()}.tmp"
    stale.write_bytes(b"half")
    live.write_bytes(b"busy")
    ag.ema.reconstruct(tmp_path / "a", 0.07, out_dir=out, progress=False)
    assert not stale.exists() and live.exists()
    code, err = run(
        capsys, "ema", "--snapshots", tmp_path / "nothing", "--std", "0.07", "--out", tmp_path / "o"
    )
    assert code == 2 and "nothing" in err
    code, err = run(capsys, "convert", tmp_path / "missing.pkl", "--out", tmp_path / "c")
    assert code == 2 and "missing.pkl" in err and not (tmp_path / "c").exists()


def test_train_bad_inputs_create_nothing(tmp_path, capsys):
    for extra, culprit in [
        (["--rampup-kimg", "-5"], "rampup_kimg"),
        (["--ema", "0.05,0.05"], "distinct"),
        (["--checkpoint-kimg", "0"], "checkpoint_kimg"),
        (["--seed", "-1"], "seed"),
        (["--data", str(tmp_path / "nope")], "nope"),
    ]:
        code, err = run(capsys, "train", "--out", tmp_path / "r", "--kimg", "0.128", "--no-progress", *extra)
        assert code == 2 and culprit in err and "Traceback" not in err, err
        assert not (tmp_path / "r").exists()


def test_errors_interrupts_pipes_and_bugs(monkeypatch, capsys):
    def raising(exc):
        def f(args):
            raise exc

        return f

    for exc, code, text in [
        (KeyboardInterrupt(), 130, "interrupted"),
        (BrokenPipeError(), 0, ""),
        (ZeroDivisionError("x"), 1, "unexpected ZeroDivisionError"),
        (AutoguideError("bad file"), 2, "error: bad file"),
    ]:
        monkeypatch.setattr(cli_generate, "_presets", raising(exc))
        got, err = run(capsys, "presets")
        assert got == code and text in err and "Traceback" not in err
        if text:
            assert err.strip().count("\n") == 0
    monkeypatch.setattr(cli_generate, "_presets", raising(ZeroDivisionError("x")))
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "presets"])


def test_a_fifo_never_blocks(tmp_path):
    fifo = tmp_path / "net.safetensors"
    os.mkfifo(fifo)
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoguide_fast.cli",
            "generate",
            "--net",
            str(fifo),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 2 and "not a regular file" in ran.stderr


def test_api_refuses_nonsense(tmp_path):
    net = ag.load(tiny(tmp_path))
    noise = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="labels are required"):
        ag.sample(net, noise, steps=2)
    with pytest.raises(TypeError, match="steps must be an integer"):
        ag.sample(net, noise, torch.eye(10)[:2], steps=2.7)
    with pytest.raises(ValueError, match="labels must be finite"):
        ag.sample(net, noise, torch.full((2, 10), float("nan")), steps=2)
    with pytest.raises(ValueError, match="labels have 3 columns"):
        ag.sample(net, noise, torch.ones(2, 3), steps=2)
    small = ag.load(tiny(tmp_path, "other", label_dim=0))
    with pytest.raises(ValueError, match="guide has label_dim 0"):
        ag.sample(net, noise, torch.eye(10)[:2], guidance=ag.Autoguidance(small, 2.0), steps=2)

    def nan_guide(x, sigma, labels=None):
        return torch.full_like(x, float("nan"))

    with pytest.raises(AutoguideError, match="the guide returned non-finite values"):
        ag.sample(net, noise, torch.eye(10)[:2], guidance=ag.Autoguidance(nan_guide, 2.0), steps=2)
    with pytest.raises(ValueError, match="reserved"):
        checkpoint.save({"__metadata__": torch.zeros(1)}, tmp_path / "m.safetensors")
    os.mkfifo(tmp_path / "dev.safetensors")
    with pytest.raises(AutoguideError, match="refusing to replace it"):
        checkpoint.save({"a": torch.zeros(1)}, tmp_path / "dev.safetensors")
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        ag.Autoguidance(net, -2.0)


def test_outputs_are_atomic_strict_json_and_honour_the_umask(tmp_path, capsys):
    net = tiny(tmp_path)
    old = os.umask(0o027)
    try:
        code, err = run(
            capsys,
            "generate",
            "--net",
            net,
            "--seeds",
            "0-2",
            "--steps",
            "2",
            "--out",
            tmp_path / "o",
            "--no-progress",
        )
    finally:
        os.umask(old)
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert files == ["000000.png", "000001.png", "000002.png", "manifest.json"]  # the grid sits beside
    assert all((tmp_path / "o" / f).stat().st_mode & 0o777 == 0o640 for f in files)
    assert (tmp_path / "o-grid.png").stat().st_mode & 0o777 == 0o640
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text(), parse_constant=pytest.fail)
    assert manifest["complete"] is True and manifest["sampler"]["churn_max"] is None  # inf -> null
