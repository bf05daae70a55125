"""The dataset tool against NVlabs/edm2's dataset_tool.py: converted pixels, names and labels equal
to the official tool's on a synthetic source (regenerated here from a seed), encoded latents equal
to its StabilityVAEEncoder's on the tiny VAE, a 2-process encode equal to a 1-process one, and bad
inputs refused before anything is written."""

import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

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
