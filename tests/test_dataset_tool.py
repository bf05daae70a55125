"""The dataset tool against NVlabs/edm2's dataset_tool.py: converted pixels, names and labels equal
to the official tool's on a synthetic source (regenerated here from a seed), encoded latents equal
to its StabilityVAEEncoder's on the tiny VAE, a 2-process encode equal to a 1-process one, and bad
inputs refused before anything is written."""

import argparse
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

import autoguide_fast
from autoguide_fast.cli.dataset import add_dataset
from autoguide_fast.data.tool import convert, encode
from conftest import free_port

DATA = Path(__file__).resolve().parent / "data" / "dataset_tool"
TINY_VAE = Path(__file__).resolve().parent / "data" / "edm2" / "official" / "tiny-vae"


def write_sources(root: Path) -> tuple[Path, Path]:
    """The synthetic sources of the reference cases (see data/dataset_tool/README.md): a folder of
    7 images of odd sizes and modes in two class folders, and a zip of 4 labelled 32x32 images."""
    rng = np.random.default_rng(2024)

    def noise(h, w, c):
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    yy, xx = np.mgrid[0:41, 0:70]
    gradient = np.stack([xx * 255 // 69, yy * 255 // 40, (xx + yy) * 255 // 109], -1).astype(np.uint8)
    folder = {
        "cat/a.png": Image.fromarray(noise(53, 37, 3)),
        "cat/b.png": Image.fromarray(gradient),
        "cat/small.png": Image.fromarray(noise(20, 20, 3)),  # too narrow for center-crop-wide 32x16
        "dog/c.png": Image.fromarray(noise(64, 64, 1)[:, :, 0]),  # grey
        "dog/d.png": Image.fromarray(noise(33, 48, 4)),  # RGBA
        "dog/f.bmp": Image.fromarray(noise(45, 45, 3)),
        "dog/sub/e.png": Image.fromarray(noise(130, 150, 3)),  # halved twice by center-crop-dhariwal
    }
    src = root / "src"
    for name, img in folder.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        img.save(src / name)
    (src / "cat" / "notes.txt").write_text("not an image")

    square = {
        "a.png": noise(32, 32, 3),
        "b.png": np.repeat(noise(32, 32, 1), 3, axis=2),
        "c/d.png": gradient[:32, :32],
        "c/e.png": noise(32, 32, 3),
    }
    sq = root / "square.zip"
    with zipfile.ZipFile(sq, "w") as z:
        for name, arr in square.items():
            with z.open(name, "w") as f:
                Image.fromarray(arr).save(f, format="png")
        z.writestr("dataset.json", json.dumps({"labels": [[n, 3 * i] for i, n in enumerate(square)]}))
    return src, sq


# The reference cases: official `dataset_tool.py convert` options, run on write_sources' outputs.
CASES = {
    "crop32": dict(source="src", transform="center-crop", resolution="32x32"),
    "wide32x16": dict(source="src", transform="center-crop-wide", resolution="32x16"),
    "dhariwal32": dict(source="src", transform="center-crop-dhariwal", resolution="32x32"),
    "dhariwal16-max5": dict(source="src", transform="center-crop-dhariwal", resolution="16x16", max_images=5),
    "none": dict(source="square.zip"),
    "none16": dict(source="square.zip", resolution="16x16"),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    write_sources(root)
    return root


def read_zip(path: Path) -> tuple[list[str], np.ndarray, str]:
    """Entry names, decoded images or arrays (every entry but dataset.json), dataset.json text."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        data = [z.read(n) for n in names if n != "dataset.json"]
        if names[0].endswith(".npy"):
            arrays = np.stack([np.load(io.BytesIO(d)) for d in data])
        else:
            arrays = np.stack([np.asarray(Image.open(io.BytesIO(d))) for d in data])
        return names, arrays, z.read("dataset.json").decode()


def official(case: str) -> tuple[list[str], np.ndarray, str]:
    with np.load(DATA / f"{case}.npz", allow_pickle=False) as z:
        return list(z["names"]), z["arrays"], str(z["dataset_json"])


def no_temporaries(folder: Path) -> bool:
    return not list(folder.glob(".*.tmp"))


@pytest.mark.parametrize("case", CASES)
def test_convert_matches_official(sources, tmp_path, case):
    opts = dict(CASES[case])
    src = sources / opts.pop("source")
    result = convert(src, tmp_path / "out.zip", **opts)
    names, images, meta = read_zip(tmp_path / "out.zip")
    ref_names, ref_images, ref_meta = official(case)
    assert names == ref_names  # 00000/img00000000.png ..., a skipped image's index left free
    assert meta == ref_meta
    np.testing.assert_array_equal(images, ref_images)  # the same PIL filters: exact
    assert result["images"] == len(ref_images) and result["resolution"] == ref_images.shape[1]
    assert result["skipped"] == (1 if case == "wide32x16" else 0) and result["labels"]
    assert no_temporaries(tmp_path)


def test_convert_folder_dest_holds_the_zip_files(sources, tmp_path):
    convert(sources / "src", tmp_path / "a.zip", transform="center-crop", resolution=32)
    (tmp_path / "empty").mkdir()
    convert(sources / "src", tmp_path / "empty", transform="center-crop", resolution=32)
    with zipfile.ZipFile(tmp_path / "a.zip") as z:
        files = {n: z.read(n) for n in z.namelist()}
    out = tmp_path / "empty"
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    # The zip again from the folder (labels from its dataset.json): the same bytes, as entries
    # carry a fixed time.
    convert(out, tmp_path / "b.zip")
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    assert no_temporaries(tmp_path)


@pytest.fixture(scope="module")
def pixels(sources):
    # Our crop32 data set (equal to the official's, test above): the input of the official encode.
    convert(sources / "src", sources / "crop32.zip", transform="center-crop", resolution=32)
    return sources / "crop32.zip"


def test_encode_matches_official(pixels, tmp_path):
    result = encode(pixels, tmp_path / "lat.zip", vae=TINY_VAE, batch=3)  # batches 3, 3, 1
    names, arrays, meta = read_zip(tmp_path / "lat.zip")
    ref_names, ref, ref_meta = official("encode-crop32")
    assert names == ref_names and meta == ref_meta  # 00000/img-mean-std-00000000.npy ...
    assert result == dict(dest=str(tmp_path / "lat.zip"), images=7, shape=[8, 8, 8], labels=True)
    assert arrays.dtype == np.float32 and arrays.shape == ref.shape == (7, 8, 8, 8)  # mean (4), std (4)
    # The same float32 network on batches of 3 where the official encodes one image at a time:
    # here the two differ by 1.6e-6 at most, on values up to 1.5, and the official's own float32
    # error (against float64) is 1.2e-6; 1e-5 leaves room for other CPUs' kernels. A wrong pixel
    # scale (e.g. [-1, 1], as diffusers pipelines feed the VAE) is off by 0.7.
    np.testing.assert_allclose(arrays, ref, rtol=1e-5, atol=1e-5)
    # And against float64 on this machine: within 2x of the float32 error of the official recipe
    # (one image per call) run here.
    x = torch.from_numpy(read_zip(pixels)[1]).permute(0, 3, 1, 2).contiguous() / 255
    vae = AutoencoderKL.from_pretrained(TINY_VAE, local_files_only=True).eval()
    with torch.no_grad():
        one = np.concatenate([posterior(vae, xi[None]) for xi in x])
        exact = posterior(vae.double(), x.double())
    assert np.abs(arrays - exact).max() <= 2 * np.abs(one - exact).max()


def posterior(vae, x: torch.Tensor) -> np.ndarray:
    d = vae.encode(x).latent_dist
    return torch.cat([d.mean, d.std], dim=1).numpy()


def test_torchrun_encode_equals_one_process(pixels, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import argparse, sys\n"
        "from autoguide_fast.cli.dataset import add_dataset\n"
        "p = argparse.ArgumentParser()\n"
        "add_dataset(p.add_subparsers(dest='command', required=True))\n"
        "args = p.parse_args(sys.argv[1:])\n"
        "sys.exit(args.func(args))\n"
    )
    package_root = str(Path(autoguide_fast.__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=package_root)
    launcher = (
        f"-m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 --master-port {free_port()}"
    )
    paths = ["--source", str(pixels), "--dest", str(tmp_path / "two.zip"), "--vae", str(TINY_VAE)]
    cmd = [
        sys.executable,
        *launcher.split(),
        str(script),
        "dataset",
        "encode",
        *paths,
        "--batch",
        "3",
        "--no-progress",
    ]
    ran = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("7 latents 8x8x8 (labelled) -> ") == 1  # rank 0 reports
    # One process, a loaded VAE, one thread as the ranks: batches 0-2, 6 on rank 0 and 3-5 on
    # rank 1 are the one process's batches, so the archive is the same, byte for byte.
    vae = AutoencoderKL.from_pretrained(TINY_VAE, local_files_only=True).eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode(pixels, tmp_path / "one.zip", vae=vae, batch=3)
    finally:
        torch.set_num_threads(threads)
    assert read_zip(tmp_path / "two.zip")[0] == read_zip(tmp_path / "one.zip")[0]
    assert (tmp_path / "two.zip").read_bytes() == (tmp_path / "one.zip").read_bytes()
    assert no_temporaries(tmp_path)


def test_cli_convert(sources, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_dataset(parser.add_subparsers(dest="command", required=True))
    paths = ["--source", str(sources / "src"), "--dest", str(tmp_path / "w.zip")]
    args = parser.parse_args(
        [
            "dataset",
            "convert",
            *paths,
            "--transform",
            "center-crop-wide",
            "--resolution",
            "32x16",
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out == f"6 images 32x32 (labelled, 1 too small skipped) -> {tmp_path / 'w.zip'}\n"
    np.testing.assert_array_equal(read_zip(tmp_path / "w.zip")[1], official("wide32x16")[1])
    for bad in (["--resolution", "64y64"], ["--max-images", "0"], ["--transform", "crop"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["dataset", "convert", "--source", "s", "--dest", "d", *bad])
        assert e.value.code == 2
    assert "--resolution" in capsys.readouterr().err


def _mixed_sizes(root: Path) -> Path:
    (root / "mixed").mkdir()
    Image.new("RGB", (32, 32)).save(root / "mixed" / "a.png")
    Image.new("RGB", (16, 16)).save(root / "mixed" / "b.png")
    return root / "mixed"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(transform="crop", resolution=32), ValueError, "transform must be None or one of center-crop, "),
        (dict(transform="center-crop", resolution="64x48"), ValueError, "got 64x48"),
        (dict(transform="center-crop-dhariwal", resolution=48), ValueError, "power-of-two side"),
        (dict(transform="center-crop-wide", resolution="32x64"), ValueError, "H <= W, got 32x64"),
        (dict(transform="center-crop"), ValueError, "transform 'center-crop' needs a resolution"),
        (dict(resolution="64x"), ValueError, "resolution must be WxH (e.g. 64x64), got '64x'"),
        (dict(max_images=0), ValueError, "max_images must be an integer >= 1 or None, got 0"),
        (dict(source="missing"), FileNotFoundError, "source not found: "),
        (dict(source="empty"), ValueError, "holds no images"),
        (dict(source="mixed"), ValueError, "b.png: image of 16x16 after the transform, but a.png is 32x32"),
        (
            dict(transform="center-crop", resolution=16, dest="full"),
            ValueError,
            "not an empty",
        ),
        (dict(source="mixed", dest=""), ValueError, "dest must name a .zip file or a folder, got ''"),
    ],
)
def test_convert_refuses(tmp_path, kwargs, error, message):
    _mixed_sizes(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    kwargs = dict(kwargs)
    source = tmp_path / kwargs.pop("source", "mixed")
    dest = kwargs.pop("dest", "out.zip")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(error, match=re.escape(message)):
        convert(source, tmp_path / dest if dest else dest, **kwargs)
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no temporaries left


def test_encode_refuses(pixels, tmp_path):
    vae = AutoencoderKL.from_pretrained(TINY_VAE, local_files_only=True).eval()
    with pytest.raises(ValueError, match=re.escape("batch must be an integer >= 1, got 0")):
        encode(pixels, tmp_path / "x.zip", vae=TINY_VAE, batch=0)
    with pytest.raises(ValueError, match="device applies to a VAE folder"):
        encode(pixels, tmp_path / "x.zip", vae=vae, device="cpu")
    with pytest.raises(FileNotFoundError, match="not a VAE folder"):
        encode(pixels, tmp_path / "x.zip", vae=tmp_path)
    with pytest.raises(ValueError, match=re.escape("b.png: image of 16x16, but a.png is 32x32")):
        encode(_mixed_sizes(tmp_path), tmp_path / "x.zip", vae=vae)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed"]
