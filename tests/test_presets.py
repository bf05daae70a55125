"""The official EDM2 / autoguidance presets, checked against NVlabs/edm2 ``generate_images.py``."""

import re
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autoguide_fast.interop import presets
from autoguide_fast.interop.presets import (
    MODEL_ROOT,
    PRESETS,
    Preset,
    get,
    locate,
    official_nimg,
    parse_official_name,
    table,
)

# (net, gnet, guidance, metric, value) as in the official file.
OFFICIAL = {
    "edm2-img512-xs-fid": ("edm2-img512-xs-2147483-0.135.pkl", None, 1.0, "fid", 3.53),
    "edm2-img512-xs-dino": ("edm2-img512-xs-2147483-0.200.pkl", None, 1.0, "fd_dinov2", 103.39),
    "edm2-img64-xl-fid": ("edm2-img64-xl-0671088-0.040.pkl", None, 1.0, "fid", 1.33),
    "edm2-img512-m-guid-dino": (
        "edm2-img512-m-2147483-0.015.pkl",
        "edm2-img512-xs-uncond-2147483-0.015.pkl",
        2.00,
        "fd_dinov2",
        41.98,
    ),
    "edm2-img512-s-autog-fid": (
        "edm2-img512-s-2147483-0.070.pkl",
        "edm2-img512-xs-0134217-0.125.pkl",
        2.10,
        "fid",
        1.34,
    ),
    "edm2-img512-xxl-autog-fid": (
        "edm2-img512-xxl-0939524-0.075.pkl",
        "edm2-img512-m-0268435-0.155.pkl",
        2.05,
        "fid",
        1.25,
    ),
    "edm2-img512-xxl-autog-dino": (
        "edm2-img512-xxl-0939524-0.130.pkl",
        "edm2-img512-m-0268435-0.205.pkl",
        2.30,
        "fd_dinov2",
        24.18,
    ),
    "edm2-img512-s-uncond-autog-fid": (
        "edm2-img512-s-uncond-2147483-0.070.pkl",
        "edm2-img512-xs-uncond-0134217-0.110.pkl",
        2.85,
        "fid",
        3.86,
    ),
    "edm2-img64-s-autog-fid": (
        "edm2-img64-s-1073741-0.045.pkl",
        "edm2-img64-xs-0134217-0.110.pkl",
        1.70,
        "fid",
        1.01,
    ),
}


def test_counts():
    assert len(PRESETS) == 36
    assert Counter(p.kind for p in PRESETS.values()) == {"none": 16, "cfg": 12, "autoguidance": 8}
    assert Counter(p.metric for p in PRESETS.values()) == {"fid": 20, "fd_dinov2": 16}


def test_official_order():
    names = list(PRESETS)
    assert names[:3] == ["edm2-img512-xs-fid", "edm2-img512-xs-dino", "edm2-img512-s-fid"]
    assert names[15:17] == ["edm2-img64-xl-fid", "edm2-img512-xs-guid-fid"]
    assert names[27:29] == ["edm2-img512-xxl-guid-dino", "edm2-img512-s-autog-fid"]
    assert names[-1] == "edm2-img64-s-autog-dino"


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_entries(name):
    p = PRESETS[name]
    assert (p.net, p.gnet, p.guidance, p.metric, p.value) == OFFICIAL[name]
    assert p.name == name


def test_kinds_of_named_entries():
    assert get("edm2-img512-xs-fid").kind == "none"
    assert get("edm2-img512-m-guid-dino").kind == "cfg"
    # An unconditional net guided by an unconditional one is autoguidance, not CFG.
    assert get("edm2-img512-s-uncond-autog-fid").kind == "autoguidance"


@pytest.mark.parametrize("p", PRESETS.values(), ids=list(PRESETS))
def test_invariants(p):
    # The name says the metric, the kind and the main model.
    assert p.metric == {"fid": "fid", "dino": "fd_dinov2"}[p.name.rsplit("-", 1)[1]]
    assert p.kind == ("cfg" if "-guid-" in p.name else "autoguidance" if "-autog-" in p.name else "none")
    assert parse_official_name(p.net).prefix == re.sub(r"(-guid|-autog)?-(fid|dino)$", "", p.name)
    assert (p.gnet is None) == (p.guidance == 1.0) == (p.kind == "none")
    assert p.value > 0
    if p.kind == "cfg":
        # Guided by the unconditional XS model, fully trained, at the same EMA length.
        assert parse_official_name(p.gnet).prefix == "edm2-img512-xs-uncond"
        assert p.gnet_ema_std == p.ema_std and p.gnet_nimg == 2**31
    if p.kind == "autoguidance":
        # Guided by a version of itself trained for a fraction of the time.
        assert p.gnet_nimg < p.nimg
        assert ("-uncond-" in p.gnet) == ("-uncond-" in p.net)
    if p.kind == "none":
        assert p.gnet_ema_std is None and p.gnet_nimg is None


@pytest.mark.parametrize("file", sorted({f for p in PRESETS.values() for f in p.files}))
def test_every_file_name_parses(file):
    prefix, kimg, ema_std = parse_official_name(file)
    assert file == f"{prefix}-{kimg:07d}-{ema_std:.3f}.pkl"
    assert 0 < ema_std < 0.289  # the range reconstruct_phema.py accepts
    # Official runs are snapshotted at multiples of 2**27 images.
    assert official_nimg(kimg) % 2**27 == 0


def test_parse_official_name():
    assert parse_official_name("edm2-img512-xs-uncond-0134217-0.125.pkl") == (
        "edm2-img512-xs-uncond",
        134217,
        0.125,
    )
    assert parse_official_name("phema-0000512-0.100.safetensors") == ("phema", 512, 0.100)
    for bad in ["edm2-img512-s-2147483.pkl", "edm2-img512-s-214748-0.070.pkl", "x-2147483-0.070.pt", ""]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_official_name(bad)


def test_official_nimg():
    assert official_nimg(2147483) == 2147483648
    assert official_nimg(134217) == 134217728
    assert official_nimg(939524) == 939524096
    assert official_nimg(0) == 0
    # No multiple of 1024 lies in [42000, 42999].
    for bad in [42, -1, 1.5, True]:
        with pytest.raises(ValueError, match="kimg"):
            official_nimg(bad)


@given(st.integers(0, 2**40))
def test_official_nimg_inverts_kimg(snapshots):
    nimg = snapshots * 1024
    assert official_nimg(nimg // 1000) == nimg


def test_url():
    p = get("edm2-img512-s-autog-fid")
    assert p.files == ("edm2-img512-s-2147483-0.070.pkl", "edm2-img512-xs-0134217-0.125.pkl")
    assert p.url(p.gnet) == (
        "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-xs-0134217-0.125.pkl"
    )
    assert MODEL_ROOT == "https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions"
    with pytest.raises(ValueError, match="edm2-img512-m-2147483-0.100.pkl"):
        p.url("edm2-img512-m-2147483-0.100.pkl")
    assert get("edm2-img512-xs-fid").files == ("edm2-img512-xs-2147483-0.135.pkl",)


def test_preset_rejects_inconsistent_data():
    p = get("edm2-img512-s-autog-fid")
    with pytest.raises(ValueError, match="kind"):
        Preset(p.name, p.net, p.gnet, p.guidance, "cfg", p.metric, p.value)
    with pytest.raises(ValueError, match="guidance"):
        Preset(p.name, p.net, None, p.guidance, "none", p.metric, p.value)
    with pytest.raises(ValueError, match="metric"):
        Preset(p.name, p.net, p.gnet, p.guidance, p.kind, "is", p.value)
    with pytest.raises(ValueError, match="model.pkl"):
        Preset(p.name, "model.pkl", p.gnet, p.guidance, p.kind, p.metric, p.value)


def test_presets_are_read_only():
    with pytest.raises(TypeError):
        PRESETS["mine"] = get("edm2-img512-xs-fid")


def test_get_suggests_close_names():
    assert get("edm2-img64-s-autog-fid") is PRESETS["edm2-img64-s-autog-fid"]
    with pytest.raises(ValueError, match=r"did you mean 'edm2-img512-s-autog-fid'"):
        get("edm2-img512-s-autog-fd")
    with pytest.raises(ValueError, match="'edm2-img512-xxl-autog-dino'"):
        get("edm2-img512-xxl-autoguidance-dino")
    with pytest.raises(ValueError, match="autoguide presets"):
        get("stable-diffusion")


def test_locate_finds_files(tmp_path):
    p = get("edm2-img512-s-autog-fid")
    for file in p.files:
        (tmp_path / file).write_bytes(b"")
    assert locate(p, tmp_path) == {"net": tmp_path / p.net, "gnet": tmp_path / p.gnet}
    # A converted file of the same name wins over the pickle.
    converted = tmp_path / "edm2-img512-xs-0134217-0.125.safetensors"
    converted.write_bytes(b"")
    assert locate(p, str(tmp_path)) == {"net": tmp_path / p.net, "gnet": converted}
    q = get("edm2-img512-s-fid")
    (tmp_path / "edm2-img512-s-2147483-0.130.safetensors").write_bytes(b"")
    assert locate(q, tmp_path) == {"net": tmp_path / "edm2-img512-s-2147483-0.130.safetensors"}


def test_locate_lists_every_missing_file(tmp_path):
    p = get("edm2-img512-xxl-autog-dino")
    with pytest.raises(FileNotFoundError) as info:
        locate(p, tmp_path)
    lines = str(info.value).splitlines()
    assert lines[1:] == [f"{MODEL_ROOT}/{p.net}", f"{MODEL_ROOT}/{p.gnet}"]
    assert str(tmp_path) in lines[0]
    # Only the missing one is listed; a directory of the right name is not a file.
    (tmp_path / p.net).write_bytes(b"")
    (tmp_path / p.gnet).mkdir()
    with pytest.raises(FileNotFoundError) as info:
        locate(p, tmp_path)
    assert str(info.value).splitlines()[1:] == [f"{MODEL_ROOT}/{p.gnet}"]


def test_locate_needs_a_directory(tmp_path):
    p = get("edm2-img512-xs-fid")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        locate(p, tmp_path / "nowhere")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="file"):
        locate(p, tmp_path / "file")
    with pytest.raises(TypeError, match="preset"):
        locate("edm2-img512-xs-fid", tmp_path)


def test_table():
    lines = table().splitlines()
    assert len(lines) == 1 + 36
    assert lines[0].split() == ["name", "kind", "net", "gnet", "guidance", "metric"]
    assert lines[1].split() == [
        "edm2-img512-xs-fid",
        "none",
        "edm2-img512-xs-2147483-0.135.pkl",
        "-",
        "1.00",
        "fid=3.53",
    ]
    row = next(line for line in lines if line.startswith("edm2-img512-s-autog-fid "))
    assert row.split() == [
        "edm2-img512-s-autog-fid",
        "autoguidance",
        "edm2-img512-s-2147483-0.070.pkl",
        "edm2-img512-xs-0134217-0.125.pkl",
        "2.10",
        "fid=1.34",
    ]
    # Columns line up.
    assert len({line.index(" none ") for line in lines if " none " in line}) == 1
    for kind, count in [("none", 16), ("cfg", 12), ("autoguidance", 8)]:
        rows = table(kind).splitlines()[1:]
        assert len(rows) == count and all(row.split()[1] == kind for row in rows)
    with pytest.raises(ValueError, match="'guided'"):
        table("guided")


def test_exports():
    assert set(presets.__all__) <= set(dir(presets))
