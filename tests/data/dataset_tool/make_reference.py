"""Remakes the reference files of tests/test_dataset_tool.py by running NVlabs/edm2's own
dataset_tool.py (a checkout of it, not shipped here) on the synthetic sources of the test:

    python tests/data/dataset_tool/make_reference.py EDM2_CHECKOUT

`convert` runs as published; `encode` runs with the tiny VAE folder as --model-url and the
official code's hard-coded 'cuda' device mapped to the CPU (the only change)."""

import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent.parent
sys.path.insert(0, str(TESTS))
from test_dataset_tool import CASES, TINY_VAE, write_sources  # noqa: E402

# Runs the official `encode` on the CPU: its pixels go `.to('cuda')`, which becomes `.to('cpu')`.
ENCODE_ON_CPU = """
import sys, torch
_to = torch.Tensor.to
torch.Tensor.to = lambda self, *a, **k: _to(self, *('cpu' if x == 'cuda' else x for x in a), **k)
import dataset_tool
dataset_tool.cmdline(sys.argv[1:])
"""


def official(edm2: Path, tmp: Path, *args: str, code: str | None = None) -> None:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "dataset_tool.py", *args]
    print(" ".join(cmd[:1] + (["-c", "<ENCODE_ON_CPU>"] if code else cmd[1:2]) + list(args)))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "DNNLIB_CACHE_DIR": str(tmp / "cache")}
    subprocess.run(cmd, cwd=edm2, check=True, env=env)


def read_zip(path: Path) -> dict:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        files = [n for n in names if n != "dataset.json"]
        if files[0].endswith(".npy"):
            arrays = np.stack([np.load(io.BytesIO(z.read(n))) for n in files])
        else:
            arrays = np.stack([np.asarray(Image.open(io.BytesIO(z.read(n)))) for n in files])
        return dict(
            names=np.array(names), arrays=arrays, dataset_json=np.array(z.read("dataset.json").decode())
        )


def main(edm2: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_sources(tmp)
        for case, opts in CASES.items():
            args = ["convert", f"--source={tmp / opts['source']}", f"--dest={tmp / case}.zip"]
            args += [f"--{k.replace('_', '-')}={v}" for k, v in opts.items() if k != "source"]
            official(edm2, tmp, *args)
            np.savez_compressed(HERE / f"{case}.npz", **read_zip(tmp / f"{case}.zip"))
        args = [
            "encode",
            f"--model-url={TINY_VAE}",
            f"--source={tmp / 'crop32.zip'}",
            f"--dest={tmp / 'enc'}.zip",
        ]
        official(edm2, tmp, *args, code=ENCODE_ON_CPU)
        np.savez_compressed(HERE / "encode-crop32.npz", **read_zip(tmp / "enc.zip"))
    print(json.dumps({p.name: p.stat().st_size for p in sorted(HERE.glob("*.npz"))}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
