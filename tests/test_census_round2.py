"""Census of bad inputs, round 2: one or more cases per class of defect found, each checking the
mechanism that now handles the class (not the single input that revealed it)."""

import io
import json
import os
import pickle
import sys
import time
import types
import zipfile

import numpy as np
import pytest
import torch

import autoguide_fast as ag
from autoguide_fast import AutoguideError
from autoguide_fast.cli import main
from autoguide_fast.data import ImageFiles, load_dataset
from autoguide_fast.ema import reconstruct
from autoguide_fast.interop import official
from autoguide_fast.networks import PRESETS, Precond
from autoguide_fast.training import TrainOptions, train
from autoguide_fast.training.state import _lock_run

SMALL = dict(
    preset="digits-xxs", batch=32, snapshot_kimg=0.064, checkpoint_kimg=0.064, log_kimg=0.032, rampup_kimg=0.0
)


# ---------------------------------------------------------------------------------------------
# Unbounded work on hostile structure: shared references in official-format pickles.


def _persistence_module():
    # A stand-in for torch_utils.persistence, so that pickle names the official global.
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        return meta

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    sys.modules.setdefault("torch_utils", types.ModuleType("torch_utils"))
    sys.modules["torch_utils.persistence"] = mod
    return _reconstruct_persistent_obj


class _Record:
    def __init__(self, fn, name, state):
        self.fn, self.name, self.state = fn, name, state

    def __reduce__(self):
        return (
            self.fn,
            (dict(type="class", class_name=self.name, state=self.state, module_src="", version=6),),
        )


def _laughs(tmp_path, depth=40, in_args=False):
    fn = _persistence_module()
    try:
        if in_args:  # constructor arguments: a list that holds itself twice, 40 levels deep
            v = [1]
            for _ in range(depth):
                v = [v, v]
            state = dict(
                _init_args=(),
                _init_kwargs=dict(img_resolution=8, img_channels=3, label_dim=0, channel_mult=v),
                _modules={},
            )
        else:  # a module tree whose every level holds the next one twice
            node = _Record(fn, "Block", dict(_parameters={}, _modules={}))
            for _ in range(depth):
                node = _Record(fn, "Block", dict(_parameters={}, _modules={"a": node, "b": node}))
            state = dict(
                _init_args=(),
                _init_kwargs=dict(img_resolution=8, img_channels=3, label_dim=0),
                _modules={"unet": node},
            )
        path = tmp_path / f"laughs-{in_args}.pkl"
        path.write_bytes(pickle.dumps({"ema": _Record(fn, "Precond", state)}))
    finally:
        del sys.modules["torch_utils.persistence"]
    return path


@pytest.mark.parametrize("in_args", [False, True], ids=["module-tree", "constructor-args"])
def test_shared_references_are_refused_quickly(tmp_path, in_args):
    path = _laughs(tmp_path, in_args=in_args)
    t0 = time.perf_counter()
    with pytest.raises(AutoguideError, match=f"{path.name}.*reached twice"):
        official.read(path)
    assert time.perf_counter() - t0 < 10  # 2^40 paths were never walked
    assert main(["convert", str(path), "--out", str(tmp_path / "o.safetensors")]) == 2


# ---------------------------------------------------------------------------------------------
# Unbounded memory on hostile data: zip entries inflated only as far as their header allows.


def _png_head(w, h):
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_zip_entries_beyond_their_header_are_refused(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        # An 8x8 PNG header followed by 32 MiB of zeros (a few KB deflated).
        z.writestr("a.png", _png_head(8, 8) + bytes(32 << 20))
    assert bomb.stat().st_size < 100_000
    for read in (load_dataset, ImageFiles):
        with pytest.raises(
            ValueError, match="a.png: the entry declares 33554.* bytes, more than its content"
        ):
            read(bomb)
    from autoguide_fast.data.tool import convert

    with pytest.raises(ValueError, match="a.png: the entry declares 33554.* bytes"):  # the dataset tool too
        convert(bomb, tmp_path / "converted.zip")
    assert main(["train", "--data", str(bomb), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# A loaded model does not depend on its file staying as it was.


def test_a_loaded_network_survives_its_file(tmp_path):
    torch.manual_seed(0)
    net = Precond(**PRESETS["digits-xxs"]).eval()
    path = tmp_path / "net.safetensors"
    ag.save(net, path)
    loaded = ag.load(path)
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]), torch.eye(10)[:2]
    with torch.no_grad():
        before = loaded(x, sigma, labels)
    torch.manual_seed(1)
    ag.save(Precond(**PRESETS["digits-xxs"]).eval(), path)  # rewritten in place, same size
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, labels), before, rtol=0, atol=0)
    os.truncate(path, 0)  # was a SIGBUS on the next forward
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, sigma, labels), before, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Names that collide, runs that mix.


def test_ema_widths_that_share_a_file_name_are_refused(tmp_path):
    with pytest.raises(ValueError, match="0.05 and 0.0504 both name files '-0.050'"):
        TrainOptions(ema_stds=(0.05, 0.0504)).validate()
    assert main(["train", "--ema", "0.05,0.0504", "--out", str(tmp_path / "r"), "--kimg", "0.032"]) == 2
    assert not (tmp_path / "r").exists()
    run = tmp_path / "run"
    train("digits", run, TrainOptions(**SMALL, kimg=0.064), progress=False)
    with pytest.raises(ValueError, match="0.0501 and 0.0504 both name files"):
        reconstruct(run, [0.0501, 0.0504], out_dir=tmp_path / "e", progress=False)


def test_a_run_folder_belongs_to_one_run(tmp_path):
    run = tmp_path / "run"
    train("digits", run, TrainOptions(**SMALL, kimg=0.064), progress=False)
    with pytest.raises(ValueError, match=r"EMA widths \[0.05, 0.1\], not \[0.07\]"):
        train("digits", run, TrainOptions(**{**SMALL, "ema_stds": (0.07,)}, kimg=0.128), progress=False)
    d = load_dataset("digits")
    other = ag.data.ImageDataset(d.images.flip(0), d.labels.flip(0), 10, "other")  # same shape
    with pytest.raises(ValueError, match="trained on another data set"):
        train(other, run, TrainOptions(**SMALL, kimg=0.128), progress=False)
    lock = _lock_run(run)  # another run writing the folder
    try:
        with pytest.raises(ValueError, match="another training run is writing this folder"):
            train("digits", run, TrainOptions(**SMALL, kimg=0.128), progress=False)
    finally:
        lock.close()
    other_run = tmp_path / "other"
    train("digits", other_run, TrainOptions(**SMALL, kimg=0.064), progress=False)
    with pytest.raises(ValueError, match="is a training run's folder"):  # ema --out into another run
        reconstruct(other_run, [0.07], out_dir=run, progress=False)


# ---------------------------------------------------------------------------------------------
# Resume after a crash.


def test_resume_after_a_kill_mid_write(tmp_path):
    run = tmp_path / "run"
    train("digits", run, TrainOptions(**SMALL, kimg=0.064), progress=False)
    with (run / "stats.jsonl").open("a") as f:
        f.write('{"nimg": 96, "kimg": 0.09')  # SIGKILL mid-line
    (run / ".network-snapshot.123456789.tmp").mkdir()  # a dead writer's temporary folder
    result = train("digits", run, TrainOptions(**SMALL, kimg=0.128), progress=False)
    assert result["status"] == "done" and not (run / ".network-snapshot.123456789.tmp").exists()
    rows = [json.loads(x) for x in (run / "stats.jsonl").read_text().splitlines()]
    assert [r["nimg"] for r in rows] == sorted({r["nimg"] for r in rows}) and rows[-1]["nimg"] == 128
    (run / "stats.jsonl").write_text('{"nimg": 32}\nnot json\n{"nimg": 64}\n')
    with pytest.raises(ValueError, match=r"stats.jsonl:2: not a stats line"):
        train("digits", run, TrainOptions(**SMALL, kimg=0.160), progress=False)


# ---------------------------------------------------------------------------------------------
# Inputs clobbered.


def test_outputs_never_overwrite_inputs(tmp_path, capsys):
    net = tmp_path / "m.npz"  # a snapshot under a misleading name
    ag.save(Precond(**PRESETS["digits-xxs"]).eval(), net)
    before = net.read_bytes()
    assert main(["generate", "--net", str(net), "--out", str(net), "--seeds", "0-1", "--steps", "2"]) == 2
    assert "is the --net input" in capsys.readouterr().err
    assert net.read_bytes() == before
    assert main(["convert", str(net), "--out", str(net)]) == 2
    assert net.read_bytes() == before


# ---------------------------------------------------------------------------------------------
# Unchecked shapes, non-finite values that passed.


def test_shapes_and_non_finite_values_are_refused():
    x = torch.randn(3, 2)
    with pytest.raises(
        ValueError, match=r"main model's output must have the shape of x \(3, 2\), got \(3, 1\)"
    ):
        ag.sample(lambda x, sigma, labels=None: x[:, :1], x, steps=2)
    with pytest.raises(ValueError, match=r"got \(1, 2\)"):  # broadcasting used to hide this
        ag.sample(lambda x, sigma, labels=None: x[:1], x, steps=2)
    # Frechet distance: NaN statistics and non-covariances (a negative "distance") are errors.
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="NaN"):
        ag.metrics.frechet_distance(mu, s * np.nan, mu, s)
    with pytest.raises(ValueError, match="must be covariances"):
        ag.metrics.frechet_distance(mu, -s, mu, -s)
    from autoguide_fast.interop.vae import EncoderInfo

    with pytest.raises(ValueError, match="scale must be finite"):
        EncoderInfo("stability_vae", vae_name="v", scale=(float("nan"),) * 4, bias=(0.0,) * 4)


# ---------------------------------------------------------------------------------------------
# Exit codes and messages; API validation.


def test_messages_name_the_culprit_in_one_line(tmp_path, capsys, monkeypatch):
    assert main(["generate", "--net", "x", "--out", ""]) == 2
    assert "--out must not be empty" in capsys.readouterr().err
    code = main(["generate", "--steps", "many"])  # an argparse error: one line and a hint, no usage
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--steps" in err and "--help" in err
    monkeypatch.setenv("AUTOGUIDE_DEBUG", "no")
    assert (
        main(["generate", "--net", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "Traceback" not in capsys.readouterr().err
    assert main(["train", "--kimg", "0.0001", "--out", str(tmp_path / "r")]) == 2  # trained nothing, exit 0
    assert "kimg must cover at least one batch" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_generate_checks_its_seeds_and_class():
    from autoguide_fast.generation import generate

    net = Precond(**PRESETS["digits-xxs"]).eval()
    for seeds, match in [
        ([], "at least one"),
        ([1, 1], "must not repeat"),
        ([1.5], "must be an integer"),
        ([True], "must be an integer"),
        ([-1], r"\[0, 2\*\*63\)"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            generate(net, seeds, steps=2)
    for class_idx in (True, 2.5):
        with pytest.raises(TypeError, match="class_idx must be an integer"):
            generate(net, [0], class_idx=class_idx, steps=2)


def test_snapshots_checked_for_layout_and_values(tmp_path):
    # A float weight stored as int32 (same bytes) is refused at load; post-hoc EMA refuses inputs
    # that disagree on a tensor's shape, and writes nothing when an input holds NaN (the Rust core).
    from autoguide_fast import checkpoint

    net = Precond(**PRESETS["digits-xxs"]).eval()
    ag.save(net, tmp_path / "good.safetensors")
    meta = checkpoint.read_metadata(tmp_path / "good.safetensors")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 4)
    checkpoint.save({**state, name: state[name].view(torch.int32)}, tmp_path / "i32.safetensors", meta)
    with pytest.raises(ValueError, match=f"{name}.*stored as torch.int32"):
        ag.load(tmp_path / "i32.safetensors")

    def snapshots(folder, changed):
        folder.mkdir()
        for k, nimg in enumerate((1000, 2000)):
            tensors = dict(state)
            if k == 1:
                tensors.update(changed)
            checkpoint.save(tensors, folder / f"s{k}.safetensors", dict(meta, nimg=str(nimg), ema_std="0.1"))
        return folder

    w = state[name]
    reshaped = snapshots(tmp_path / "shape", {name: w.reshape(w.shape[1], w.shape[0], *w.shape[2:])})
    with pytest.raises(ValueError, match="snapshots disagree on tensors"):
        reconstruct(reshaped, 0.07, out_dir=tmp_path / "o1", progress=False)
    nan = snapshots(tmp_path / "nan", {name: torch.full_like(w, float("nan"))})
    with pytest.raises(AutoguideError, match=f"{name} would hold NaN or infinity.*nothing was written"):
        reconstruct(nan, 0.07, out_dir=tmp_path / "o2", progress=False)
    assert not list((tmp_path / "o2").glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Checks made before anything is created.


def test_checks_come_before_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    ag.save(Precond(**PRESETS["digits-xxs"]).eval(), tmp_path / "main.safetensors")
    ag.save(Precond(**PRESETS["img32-xs"]).eval(), tmp_path / "other.safetensors")
    from autoguide_fast.studies.sweep import sweep

    with pytest.raises(ValueError, match="main and guide must make the same samples"):
        sweep(tmp_path / "main.safetensors", tmp_path / "other.safetensors", "2.0", tmp_path / "sw")
    assert not (tmp_path / "sw").exists()
    code = main(
        [
            "generate",
            "--net",
            str(tmp_path / "main.safetensors"),
            "--churn",
            "10",
            "--churn-noise",
            "nan",
            "--seeds",
            "0",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "churn_noise must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_guide_of_other_samples_is_refused_before_outputs(tmp_path, capsys):
    # A toy model (2-D samples) as the guide of an image model: refused by the shape its samples
    # have (sampling.check_inputs, once in generate), before the output folder exists.
    from autoguide_fast.networks.toy import ToyModel

    ag.save(Precond(**PRESETS["digits-xxs"]).eval(), tmp_path / "main.safetensors")
    ag.save(ToyModel().eval(), tmp_path / "toy.safetensors")
    args = ["--net", str(tmp_path / "main.safetensors"), "--guide", str(tmp_path / "toy.safetensors")]
    assert main(["generate", *args, "--weight", "2", "--steps", "2", "--out", str(tmp_path / "o")]) == 2
    assert "the guide makes (2,)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ctrl_c_during_start_up_ends_in_one_line(monkeypatch, capsys):
    # Importing torch and the library (building the parser) happens inside main's error policy.
    import autoguide_fast.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["presets"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and err.strip().count("\n") == 0


def test_api_misuse_is_named_not_raw():
    # Input errors surface as ValueError/TypeError naming the parameter (checks.py), not as an
    # AttributeError or RuntimeError from deep inside torch.
    from autoguide_fast.ema import PowerFunctionEMA
    from autoguide_fast.generation import generate

    net = Precond(**PRESETS["digits-xxs"]).eval()
    with pytest.raises(TypeError, match="net must be a denoiser"):
        ag.sample("main.safetensors", torch.randn(2, 2))
    with pytest.raises(ValueError, match="device must be a device"):
        list(generate(net, [0], steps=2, device="gpu0"))
    with pytest.raises(ValueError, match="device must be a device"):
        ag.load("missing.safetensors", device="gpu0")
    with pytest.raises(TypeError, match="net must be a torch.nn.Module"):
        PowerFunctionEMA(None, (0.05,))
    with pytest.raises(TypeError, match="seeds must be an integer"):
        ag.seeded_noise([0.5], (2,))
    with pytest.raises(ValueError, match="stds must be a non-empty sequence"):
        PowerFunctionEMA(net, "0.05")
    with pytest.raises(ValueError, match=r"x must have shape \[N, 1, H, W\]"):
        net(torch.randn(1, 4, 8, 8), torch.ones(1))


def test_environment_failures_and_kernel_setting(tmp_path, capsys, monkeypatch):
    # A full disk is the machine's failure (exit 1), not bad input (exit 2); a bad
    # AUTOGUIDE_KERNELS is named before generate creates anything.
    import errno

    import autoguide_fast.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with(parser(), "convert", full))
    assert main(["convert", "a.pkl", "--out", str(tmp_path / "o")]) == 1
    assert "environment failure" in capsys.readouterr().err
    ag.save(Precond(**PRESETS["digits-xxs"]).eval(), tmp_path / "m.safetensors")
    monkeypatch.setenv("AUTOGUIDE_KERNELS", "fastest")
    assert (
        main(
            [
                "generate",
                "--net",
                str(tmp_path / "m.safetensors"),
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "AUTOGUIDE_KERNELS must be" in capsys.readouterr().err and not (tmp_path / "o").exists()


def _with(parser, command, func):
    sub = next(a for a in parser._actions if a.dest == "command")
    sub.choices[command].set_defaults(func=func)
    return parser


def test_pickled_data_never_holds_python_objects(tmp_path):
    # numpy.ndarray called directly, or _reconstruct with an object typecode, would make arrays of
    # Python objects: refused in reference statistics and in official checkpoints alike.
    direct = b"\x80\x02cnumpy\nndarray\nK\x02\x85X\x01\x00\x00\x00O\x86R."
    objects = (
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85X\x01\x00\x00\x00O\x87R."
    )
    for i, data in enumerate((direct, objects)):
        path = tmp_path / f"ref{i}.pkl"
        path.write_bytes(data)
        with pytest.raises(AutoguideError, match="ndarray called directly|Python objects"):
            official.unpickle(path, arrays_only=True)
        with pytest.raises(AutoguideError, match="ndarray called directly|Python objects"):
            official.unpickle(path)
    ok = tmp_path / "ok.pkl"
    ok.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(3), "sigma": np.eye(3)}}, protocol=2))
    assert ag.metrics.load_ref(ok)["fid"]["sigma"].shape == (3, 3)  # numpy's own pickling still reads
