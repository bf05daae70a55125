"""Post-hoc EMA: coefficients against the reference, the streaming reconstruction against
torch arithmetic, and against an EMA tracked online during training."""

import json
import re

import numpy as np
import pytest
import torch

import autoguide_fast as ag
from autoguide_fast import AutoguideError, checkpoint
from autoguide_fast.cli import main
from autoguide_fast.ema import list_snapshots, reconstruct, solve_coefficients
from autoguide_fast.networks import PRESETS, Precond
from autoguide_fast.training import TrainOptions, train


def test_coefficients_match_reference(reference):
    r = reference("phema.json")["solve"]
    x = solve_coefficients(r["in_nimg"], r["in_std"], r["out_nimg"], r["out_std"])
    want = np.array(r["coefs"])
    assert x.shape == want.shape == (len(r["in_nimg"]), len(r["out_nimg"]))
    for j in range(x.shape[1]):
        assert np.linalg.norm(x[:, j] - want[:, j]) <= 1e-7 * np.linalg.norm(want[:, j])
    np.testing.assert_allclose(x.sum(0), 1.0, rtol=0, atol=1e-12)


def test_coefficient_errors_say_why():
    with pytest.raises(ValueError, match="given twice"):
        solve_coefficients([1e6, 1e6, 2e6], [0.1, 0.1, 0.05], 2e6, 0.07)
    with pytest.raises(ValueError, match="out_nimg.*no extrapolation"):
        solve_coefficients([1e6, 2e6], [0.1, 0.1], 3e6, 0.07)
    with pytest.raises(ValueError, match="std must be"):
        solve_coefficients([1e6, 2e6], [0.1, 0.1], 2e6, 0.35)


def make_run(
    tmp_path, nimgs=(1000, 2000, 3000, 4000), stds=(0.05, 0.1), dtype=torch.float32, seed=0, name="run"
):
    """Snapshots of a small EDM2 network with random weights; returns {(nimg, std): state}."""
    run = tmp_path / name
    states = {}
    torch.manual_seed(seed)
    net = Precond(**PRESETS["digits-xs"])
    for n in nimgs:
        for s in stds:
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.randn_like(p))
            ag.save(net.to(dtype), run / f"network-snapshot-{n:09d}-{s:.3f}.safetensors", nimg=n, ema_std=s)
            net.float()
            states[(n, s)] = {
                k: v.clone()
                for k, v in checkpoint.load(run / f"network-snapshot-{n:09d}-{s:.3f}.safetensors").items()
            }
    return run, states


def test_a_profile_equal_to_an_input_reproduces_it(tmp_path):
    run, states = make_run(tmp_path)
    [path] = reconstruct(run, 0.1, out_nimg=3000, out_dir=tmp_path / "out", progress=False)
    got = checkpoint.load(path)
    for k, v in states[(3000, 0.1)].items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5)
    meta = checkpoint.read_metadata(path)
    assert meta["nimg"] == "3000" and float(meta["ema_std"]) == 0.1
    assert json.loads(meta["posthoc"])["inputs"] == 6  # the snapshots up to nimg 3000


def test_a_time_between_snapshots_reconstructs(tmp_path):
    # nimg 2500 lies between the snapshots at 2000 and 3000: the inputs are those up to 3000, and
    # the result is their combination by the solved coefficients (float64 here, float32 sums there).
    run, states = make_run(tmp_path)
    [path] = reconstruct(run, 0.07, out_nimg=2500, out_dir=tmp_path / "out", progress=False)
    meta = checkpoint.read_metadata(path)
    assert meta["nimg"] == "2500" and json.loads(meta["posthoc"])["inputs"] == 6
    keys = sorted(k for k in states if k[0] <= 3000)
    x = solve_coefficients([n for n, _ in keys], [s for _, s in keys], 2500, 0.07)[:, 0]
    got = checkpoint.load(path)
    for name, v in got.items():
        if v.is_floating_point():
            want = sum(float(c) * states[k][name].double() for c, k in zip(x, keys))
            torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out_nimg"):
        reconstruct(run, 0.07, out_nimg=4001, out_dir=tmp_path / "o2", progress=False)


def assert_rounded_once(got: torch.Tensor, want: torch.Tensor, want32: torch.Tensor) -> None:
    """``got`` (16-bit) is the float64 sum ``want`` rounded once to its dtype, as ``Tensor.to``
    rounds, with no more error than torch summing in float32 (``want32``) and rounding at the end:
    float32 sums may carry a value that lies near a rounding midpoint to the other side."""
    once, torch32 = want.to(got.dtype), want32.to(got.dtype)
    err, err_torch = ((t.double() - want).norm() for t in (got, torch32))
    assert err <= 1.01 * err_torch, (float(err), float(err_torch))
    differ, differ_torch = int((got != once).sum()), int((torch32 != once).sum())
    assert differ <= 2 * differ_torch + 10, (differ, differ_torch, got.numel())


def weighted_sums(states, keys, coefs, name):
    """The float64 and the float32 weighted sums of tensor ``name`` of the snapshots."""
    want = sum(float(c) * states[key][name].double() for c, key in zip(coefs, keys))
    want32 = sum(float(c) * states[key][name].float() for c, key in zip(coefs, keys))
    return want, want32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reconstruction_is_the_weighted_sum_and_copies_buffers(tmp_path, dtype):
    """16-bit snapshots give 16-bit outputs by default, each tensor the weighted sum rounded once."""
    run, states = make_run(tmp_path, dtype=dtype)
    paths = reconstruct(run, [0.07, 0.13], out_dir=tmp_path / "out", progress=False)
    keys = sorted(states)
    x = solve_coefficients([n for n, _ in keys], [s for _, s in keys], 4000, [0.07, 0.13])
    buffers = {name for name, _ in Precond(**PRESETS["digits-xs"]).named_buffers()}
    for j, path in enumerate(paths):
        got = checkpoint.load(path)
        assert sorted(got) == sorted(states[keys[-1]])
        for k in got:
            assert got[k].dtype == dtype, k
            if k in buffers:  # copied from the newest input, not averaged
                assert torch.equal(got[k], states[keys[-1]][k])
                continue
            assert_rounded_once(got[k], *weighted_sums(states, keys, x[:, j], k))
        ag.load(path)  # a loadable network


def test_an_explicit_dtype_applies_to_every_averaged_tensor(tmp_path):
    run, states = make_run(tmp_path)
    keys = sorted(states)
    x = solve_coefficients([n for n, _ in keys], [s for _, s in keys], 4000, [0.09])
    buffers = {name for name, _ in Precond(**PRESETS["digits-xs"]).named_buffers()}
    for dtype, want_dtype in [
        (torch.float16, torch.float16),
        ("bfloat16", torch.bfloat16),
        ("float32", torch.float32),
    ]:
        [path] = reconstruct(run, 0.09, out_dir=tmp_path / str(dtype), progress=False, dtype=dtype)
        got = checkpoint.load(path)
        for k in got:
            if k in buffers:  # copied as they are
                assert got[k].dtype == torch.float32 and torch.equal(got[k], states[keys[-1]][k])
                continue
            assert got[k].dtype == want_dtype, (dtype, k)
            want, want32 = weighted_sums(states, keys, x[:, 0], k)
            if want_dtype == torch.float32:
                torch.testing.assert_close(got[k].double(), want, rtol=1e-5, atol=1e-5)
            else:
                assert_rounded_once(got[k], want, want32)


def test_a_tensor_whose_dtype_differs_between_inputs_is_written_in_float32(tmp_path):
    run = tmp_path / "run"
    for k, (n, dtype) in enumerate([(1000, torch.float16), (2000, torch.float16), (3000, torch.bfloat16)]):
        state = {"same": torch.full((3,), 1.0 + k, dtype=torch.float16), "mixed": torch.ones(5, dtype=dtype)}
        checkpoint.save(state, run / f"s-{k}.safetensors", dict(nimg=str(n), ema_std="0.1"))
    [path] = reconstruct(run, 0.1, out_dir=tmp_path / "out", progress=False)
    got = checkpoint.load(path)
    assert got["same"].dtype == torch.float16 and got["mixed"].dtype == torch.float32
    torch.testing.assert_close(got["mixed"], torch.ones(5))  # the coefficients sum to 1


def test_a_bad_dtype_is_refused_before_anything_is_written(tmp_path):
    run, _ = make_run(tmp_path, nimgs=(1000, 2000))
    out = tmp_path / "out"
    for bad in [torch.float64, torch.int8, "half", "F16", "torch.float16", 16, ["float16"]]:
        with pytest.raises(ValueError, match=r"^dtype must be .*, got " + re.escape(repr(bad))):
            reconstruct(run, 0.07, out_dir=out, progress=False, dtype=bad)
    assert not out.exists()


def test_mixed_dtypes_orders_and_counts(tmp_path):
    """9 inputs (a group of 8 and 1) with a different dtype per tensor and file (so tensors sit
    in a different order in each file), 11 outputs (blocks of 8, 2 and 1), odd sizes and a
    tensor spanning several work chunks: every output is the float64 weighted sum."""
    g = torch.Generator().manual_seed(3)
    shapes = {"big": (70001,), "odd": (5, 7), "scalar": (), "w": (3, 1, 3, 3)}
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    run, states = tmp_path / "run", []
    nimgs = [1000 * (k // 3 + 1) for k in range(9)]
    in_stds = [0.04, 0.09, 0.15] * 3
    for k, (n, s) in enumerate(zip(nimgs, in_stds)):
        state = {
            name: torch.randn(shape, generator=g).to(dtypes[(k + i) % 3])
            for i, (name, shape) in enumerate(shapes.items())
        }
        states.append(state)
        checkpoint.save(state, run / f"s-{k}.safetensors", dict(nimg=str(n), ema_std=str(s)))
    orders = {tuple(checkpoint.open(run / f"s-{k}.safetensors").keys()) for k in range(9)}
    assert len(orders) > 1  # the files really differ in tensor order
    out_std = [0.05 + 0.01 * j for j in range(11)]
    paths = reconstruct(run, out_std, out_dir=tmp_path / "out", progress=False)
    x = solve_coefficients(nimgs, in_stds, max(nimgs), out_std)
    for j, path in enumerate(paths):
        got = checkpoint.load(path)
        assert sorted(got) == sorted(shapes)
        for name in shapes:
            want = sum(float(x[i, j]) * states[i][name].double() for i in range(9))
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name].double(), want, rtol=1e-5, atol=1e-5)


def test_an_interrupted_reconstruction_leaves_nothing(tmp_path):
    """An exception from the progress callback (where Ctrl-C surfaces) stops the work; no output,
    final or temporary, remains."""
    from autoguide_fast import _core

    run, _ = make_run(tmp_path)
    snaps = list_snapshots(run)
    coefs = solve_coefficients([s.nimg for s in snaps], [s.std for s in snaps], 4000, [0.07, 0.1])
    out = tmp_path / "out"
    out.mkdir()
    outputs = [(out / f"o{j}.safetensors", {"nimg": "4000"}) for j in range(2)]

    def stop(done, total):
        if done * 2 >= total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _core.reconstruct([s.path for s in snaps], coefs.tolist(), outputs, [], stop)
    assert list(out.iterdir()) == []


def test_reconstruction_is_linear(tmp_path):
    run_y, ys = make_run(tmp_path, seed=1, name="y")
    run_z, zs = make_run(tmp_path, seed=2, name="z")
    run_x = tmp_path / "x"
    for key in ys:
        n, s = key
        mix = {k: 2.0 * ys[key][k] - 0.5 * zs[key][k] for k in ys[key]}
        checkpoint.save(mix, run_x / f"s-{n}-{s}.safetensors", dict(nimg=str(n), ema_std=str(s)))
    [rx] = reconstruct(run_x, 0.08, out_dir=tmp_path / "ox", progress=False)
    [ry] = reconstruct(run_y, 0.08, out_dir=tmp_path / "oy", progress=False)
    [rz] = reconstruct(run_z, 0.08, out_dir=tmp_path / "oz", progress=False)
    gx, gy, gz = (checkpoint.load(p) for p in (rx, ry, rz))
    for k in gx:
        torch.testing.assert_close(gx[k], 2.0 * gy[k] - 0.5 * gz[k], rtol=1e-4, atol=1e-4)


def test_bad_inputs_fail_before_any_output(tmp_path):
    run, _ = make_run(tmp_path)
    other = Precond(**PRESETS["digits-s"])
    ag.save(other, run / "network-snapshot-000005000-0.050.safetensors", nimg=5000, ema_std=0.05)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="network-snapshot-000005000-0.050.safetensors differ in config"):
        reconstruct(run, 0.07, out_dir=out, progress=False)
    assert not out.exists() or not list(out.iterdir())
    (run / "network-snapshot-000005000-0.050.safetensors").write_bytes(b"garbage!" * 10)
    with pytest.raises(AutoguideError, match="not a valid safetensors file"):
        reconstruct(run, 0.07, out_dir=out, progress=False)
    (run / "network-snapshot-000005000-0.050.safetensors").unlink()
    with pytest.raises(ValueError, match="out_nimg must be in"):
        reconstruct(run, 0.07, out_nimg=9999, out_dir=out, progress=False)
    with pytest.raises(ValueError, match="std must be"):
        reconstruct(run, 0.5, out_dir=out, progress=False)
    with pytest.raises(FileNotFoundError):
        reconstruct(tmp_path / "nothing", 0.07, out_dir=out, progress=False)
    assert not out.exists() or not list(out.iterdir())


def test_posthoc_matches_an_ema_tracked_online(tmp_path):
    # Train with widths 0.05 and 0.10 saved often, and 0.07 tracked online as the answer.
    opts = TrainOptions(
        preset="digits-xs",
        kimg=0.64,
        batch=32,
        ema_stds=(0.05, 0.07, 0.10),
        snapshot_kimg=0.064,
        checkpoint_kimg=0.64,
        log_kimg=0.64,
        rampup_kimg=0.1,
        lr_decay_kimg=0.2,
    )
    train("digits", tmp_path / "run", opts, progress=False)
    inputs = [s.path for s in list_snapshots(tmp_path / "run") if s.std != 0.07]
    [path] = reconstruct(inputs, 0.07, out_dir=tmp_path / "out", progress=False)
    posthoc, online = (
        checkpoint.load(path),
        checkpoint.load(tmp_path / "run" / "network-snapshot-000000640-0.070.safetensors"),
    )
    narrow = checkpoint.load(tmp_path / "run" / "network-snapshot-000000640-0.050.safetensors")
    params = [k for k in online if online[k].ndim > 0 and "fourier" not in k]
    err = sum((posthoc[k] - online[k]).square().sum() for k in params).sqrt()
    gap = sum((narrow[k] - online[k]).square().sum() for k in params).sqrt()
    assert err < 0.2 * gap, (float(err), float(gap))


def test_cli(tmp_path, capsys):
    run, _ = make_run(tmp_path)
    assert main(["ema", "--list", str(run)]) == 0
    out = capsys.readouterr().out
    assert "8 snapshots" in out and "std 0.100" in out
    assert (
        main(
            [
                "ema",
                "--snapshots",
                str(run),
                "--std",
                "0.06,0.09",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "phema-000004000-0.060.safetensors",
        "phema-000004000-0.090.safetensors",
    ]
    assert main(["ema", "--snapshots", str(run)]) == 2
    assert (
        main(
            [
                "ema",
                "--snapshots",
                str(run),
                "--std",
                "0.07",
                "--out",
                str(tmp_path / "h"),
                "--dtype",
                "float16",
                "--no-progress",
            ]
        )
        == 0
    )
    [path] = (tmp_path / "h").iterdir()
    assert checkpoint.load(path)["unet.out_conv.weight"].dtype == torch.float16
    code = main(
        ["ema", "--snapshots", str(run), "--std", "0.07", "--out", str(tmp_path / "x"), "--dtype", "half"]
    )
    assert code == 2 and not (tmp_path / "x").exists()  # refused by the parser: exit 2, nothing made


def test_a_nan_in_a_snapshot_fails_naming_the_tensor_and_writes_nothing(tmp_path):
    run, states = make_run(tmp_path)
    path = run / "network-snapshot-000002000-0.050.safetensors"
    name = "unet.out_conv.weight"
    poisoned = dict(states[(2000, 0.05)])
    poisoned[name] = poisoned[name].clone()
    poisoned[name].view(-1)[3] = float("nan")
    checkpoint.save(poisoned, path, checkpoint.read_metadata(path))
    before = sorted(p.name for p in run.iterdir())
    out = tmp_path / "out"
    out.mkdir()
    cause = f"input {path} holds NaN or infinity in it"
    with pytest.raises(
        AutoguideError, match=f"tensor {re.escape(name)} would hold NaN or infinity \\({re.escape(cause)}\\)"
    ):
        reconstruct(run, [0.07, 0.1], out_dir=out, progress=False)
    assert list(out.iterdir()) == []  # neither outputs nor their temporaries
    assert sorted(p.name for p in run.iterdir()) == before
    with pytest.raises(AutoguideError, match=re.escape(name)):
        reconstruct(run, 0.07, out_dir=tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh").exists()
