"""Official EDM2 pickles: read without executing anything, converted bit for bit, and every output of
the official tools in tests/data/edm2/official reproduced (tolerances of its README)."""

import io
import json
import pickle
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import autoguide_fast as ag
from autoguide_fast import AutoguideError, checkpoint
from autoguide_fast.generation import generate
from autoguide_fast.interop import official, presets
from autoguide_fast.interop.vae import decode, load_vae
from conftest import REFERENCE_DIR

OFFICIAL = REFERENCE_DIR / "official"
MANIFEST = json.loads((OFFICIAL / "manifest.json").read_text()) if OFFICIAL.is_dir() else {}
GENERATE_CASES = [k for k, v in MANIFEST.items() if "net" in v]


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "autoguide_fast.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _guidance(case):
    gnet = case["gnet"] and ag.load(OFFICIAL / case["gnet"])
    if not gnet:
        return None
    return (ag.CFG if gnet.label_dim == 0 else ag.Autoguidance)(gnet, case["guidance"])


@pytest.mark.parametrize("name", GENERATE_CASES)
def test_generation_reproduces_the_official_tool(name):
    case = MANIFEST[name]
    ref = np.load(OFFICIAL / f"generate-{name.replace('_', '-')}.npz")
    net = ag.load(OFFICIAL / case["net"])
    assert {t.dtype for t in net.state_dict().values()} == {torch.float16}  # kept as published
    vae = load_vae(OFFICIAL / case["vae"]) if "vae" in case else None
    churn = dict(
        churn=case.get("S_churn", 0),
        churn_min=case.get("S_min", 0),
        churn_max=case.get("S_max", float("inf")),
        churn_noise=case.get("S_noise", 1),
    )
    batches = list(
        generate(
            net,
            ref["seeds"].tolist(),
            guidance=_guidance(case),
            class_idx=case["class_idx"],
            batch=3,
            steps=case["steps"],
            vae=vae,
            device="cpu",
            **churn,
        )
    )
    floats = torch.cat([b.samples for b in batches])
    images = torch.cat([b.images for b in batches]).permute(0, 2, 3, 1).numpy()
    assert [s for b in batches for s in b.seeds] == ref["seeds"].tolist()
    if net.label_dim:
        classes = torch.cat([b.classes for b in batches])
        assert torch.equal(
            torch.nn.functional.one_hot(classes, net.label_dim), torch.from_numpy(ref["labels"])
        )
    assert (floats - torch.from_numpy(ref["floats"])).abs().max() <= 1e-3
    off = np.abs(images.astype(np.int16) - ref["images"].astype(np.int16))
    assert off.max() <= 1 and (off > 0).mean() <= 1e-3


def test_the_official_noise_and_labels_are_drawn_per_seed():
    ref = np.load(OFFICIAL / "generate-autoguidance-w2-class3.npz")
    rng = ag.PerSampleRNG(ref["seeds"].tolist())
    assert torch.equal(rng.randn((3, 16, 16)), torch.from_numpy(ref["noise"]))
    assert (ref["labels"].argmax(1) == 3).all()


def test_convert_keeps_the_pickled_tensors_bit_for_bit(tmp_path):
    out = checkpoint.convert(OFFICIAL / "latent-main.pkl", tmp_path)
    assert out == [tmp_path / "latent-main.safetensors"]
    raw = official.unpickle(OFFICIAL / "latent-main.pkl")["ema"]
    want: dict[str, torch.Tensor] = {}
    official._module_tensors(raw, "", want)
    got = checkpoint.load(out[0])
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.float16
        assert torch.equal(got[k].view(torch.int16), want[k].view(torch.int16)), k
    net = ag.load(out[0])
    assert net.encoder == official.read(OFFICIAL / "latent-main.pkl").encoder
    assert net.encoder.kind == "stability_vae" and net.encoder.vae_name == "stabilityai/sd-vae-ft-mse"
    meta = checkpoint.read_metadata(out[0])
    assert meta["source"] == "latent-main.pkl" and "nimg" not in meta  # not an official snapshot name
    # A float32 cast on request, and the same network either way.
    net32 = ag.load(out[0], dtype="float32")
    assert {t.dtype for t in net32.state_dict().values()} == {torch.float32}


def test_convert_a_folder_of_raw_snapshots(tmp_path):
    out = checkpoint.convert(OFFICIAL / "phema", tmp_path / "run")
    assert len(out) == 8
    rows = ag.ema.list_snapshots(tmp_path / "run")
    assert [(s.nimg, s.std) for s in rows][-2:] == [(2048000, 0.05), (2048000, 0.1)]
    assert rows[0].nimg == presets.official_nimg(512) == 512000


def test_posthoc_ema_from_official_snapshots_matches_the_official_tool(tmp_path):
    case = MANIFEST["phema_std0.070"]
    paths = ag.ema.reconstruct(OFFICIAL / "phema", case["out_std"], out_dir=tmp_path, progress=False)
    assert len(paths) == 1
    got, want = checkpoint.load(paths[0]), checkpoint.load(OFFICIAL / case["output"])
    assert checkpoint.read_metadata(paths[0])["nimg"] == str(case["nimg"])
    for k, w in want.items():
        assert got[k].dtype == torch.float16  # written as the inputs, as the official tool does
        torch.testing.assert_close(got[k].float(), w, rtol=1e-3, atol=1e-6)
    assert not list(tmp_path.glob(".*"))  # no temporary conversions left


# ---------------------------------------------------------------------------------------------
# Hostile and foreign files: refused, nothing executed.


class _Evil:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _fake_official_modules(monkeypatch):
    # Importable stand-ins so that pickle writes the official global names.
    persistence = types.ModuleType("torch_utils.persistence")
    util = types.ModuleType("dnnlib.util")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called")

    class EasyDict(dict):
        pass

    _reconstruct_persistent_obj.__module__ = persistence.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = util.__name__, "EasyDict"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    util.EasyDict = EasyDict
    fakes = dict(torch_utils=types.ModuleType("torch_utils"), dnnlib=types.ModuleType("dnnlib"))
    fakes.update({"torch_utils.persistence": persistence, "dnnlib.util": util})
    for name, mod in fakes.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return persistence, util


def _hostile_pickles(monkeypatch, sentinel):
    persistence, util = _fake_official_modules(monkeypatch)
    write = f"open({str(sentinel)!r}, 'w').write('pwned')"
    meta = dict(type="class", version=6, module_src=write, class_name="Precond", state={})
    record = _Evil(persistence._reconstruct_persistent_obj, meta)
    return {
        "os.system": pickle.dumps(_Evil(__import__("os").system, f"touch {sentinel}")),
        "eval": pickle.dumps(_Evil(eval, write)),
        "persistence source": pickle.dumps(util.EasyDict(ema=record)),
        "exec in EasyDict": pickle.dumps(util.EasyDict(ema=_Evil(exec, write), encoder=None)),
        "subprocess in a tensor rebuild": pickle.dumps(
            {"ema": _Evil(subprocess.call, ["touch", str(sentinel)])}
        ),
    }


def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    cases = _hostile_pickles(monkeypatch, sentinel)
    for what, data in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.pkl"
        path.write_bytes(data)
        with pytest.raises(AutoguideError, match=str(path).replace(".", r"\.")):
            ag.load(path)
        assert not sentinel.exists(), what
    # The refusal names the global.
    with pytest.raises(AutoguideError, match=r"global (posix|os)\.system"):
        official.unpickle(tmp_path / "os.system.pkl")
    with pytest.raises(AutoguideError, match=r"builtins\.exec"):
        official.unpickle(tmp_path / "exec_in_EasyDict.pkl")
    # The record's embedded source is data: read, never run.
    raw = official.unpickle(tmp_path / "persistence_source.pkl")
    assert raw["ema"].class_name == "Precond" and "module_src" not in raw["ema"].state


def test_the_cli_refuses_a_hostile_pickle_with_one_line(tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "net.pkl"
    path.write_bytes(_hostile_pickles(monkeypatch, sentinel)["os.system"])
    ran = _cli("generate", "--net", path, "--out", tmp_path / "out", "--seeds", "0")
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert ran.stderr.startswith("autoguide generate: error: ") and str(path) in ran.stderr
    assert not sentinel.exists() and not (tmp_path / "out").exists()


def test_truncated_and_foreign_files_name_the_file(tmp_path):
    data = (OFFICIAL / "guide.pkl").read_bytes()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AutoguideError, match=r"cut\.pkl: .*truncated"):
        ag.load(cut)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    with pytest.raises(AutoguideError, match=r"plain\.pkl: not an official EDM2 network pickle"):
        ag.load(plain)
    archive = tmp_path / "torchsave.pkl"
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    archive.write_bytes(buf.getvalue())
    with pytest.raises(AutoguideError, match=r"torchsave\.pkl: this is a torch.save archive"):
        ag.load(archive)
    text = tmp_path / "text.pkl"
    text.write_text("hello")
    with pytest.raises(AutoguideError, match=r"text\.pkl: not an official EDM2 pickle"):
        ag.load(text)
    # The pickle of an encoder alone, or of a network of another class.
    only_encoder = official.unpickle(OFFICIAL / "main.pkl")["encoder"]
    assert only_encoder.class_name == "StandardRGBEncoder"


def test_a_latent_network_needs_its_vae_and_latents_are_never_written_as_rgba(tmp_path):
    net = ag.load(OFFICIAL / "latent-main.pkl")
    with pytest.raises(ValueError, match="--vae VAE_DIR"):
        next(generate(net, [0], device="cpu"))
    net.encoder = None  # a 4-channel network without an encoder description
    with pytest.raises(ValueError, match="4-channel samples and has no encoder description"):
        next(generate(net, [0], device="cpu"))
    with pytest.raises(ValueError, match="no encoder description"):
        decode(torch.zeros(1, 4, 8, 8), None)
    with pytest.raises(FileNotFoundError, match="not a VAE folder"):
        load_vae(tmp_path)


def test_cli_generate_with_a_preset_and_official_files(tmp_path):
    preset = presets.get("edm2-img512-s-autog-fid")
    models = tmp_path / "models"
    models.mkdir()
    # The reference networks stand in for the published ones under their official names.
    shutil.copy(OFFICIAL / "main.pkl", models / preset.net)
    ran = _cli("generate", "--preset", preset.name, "--models", models, "--out", tmp_path / "x")
    assert ran.returncode == 2 and f"{presets.MODEL_ROOT}/{preset.gnet}" in ran.stderr
    shutil.copy(OFFICIAL / "guide.pkl", models / preset.gnet)
    out = tmp_path / "out.npz"
    ran = _cli("generate", "--preset", preset.name, "--models", models, "--seeds", "0-7", "--out", out)
    assert ran.returncode == 0, ran.stderr
    manifest = json.loads((tmp_path / "out-manifest.json").read_text())
    assert manifest["guidance"]["weight"] == preset.guidance == 2.1 and manifest["preset"] == preset.name
    assert manifest["models"]["net"]["ema_std"] == "0.07"
    # Same networks and weight through the API: the same images.
    net, guide = ag.load(models / preset.net), ag.load(models / preset.gnet)
    want = torch.cat(
        [b.images for b in generate(net, range(8), guidance=ag.Autoguidance(guide, 2.1), device="cpu")]
    )
    assert np.array_equal(np.load(out)["images"], want.permute(0, 2, 3, 1).numpy())


def test_cli_convert_and_presets(tmp_path):
    ran = _cli("convert", OFFICIAL / "guide.pkl", "--out", tmp_path / "g.safetensors")
    assert ran.returncode == 0, ran.stderr
    assert ag.load(tmp_path / "g.safetensors").config == ag.load(OFFICIAL / "guide.pkl").config
    listing = _cli("presets").stdout
    assert all(name in listing for name in presets.PRESETS) and "fid=1.25" in listing
