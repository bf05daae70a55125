"""The README as a newcomer runs it: every ``autoguide`` command line parses (each optional part in
brackets tried too), and the Python blocks run in shortened forms on local stand-ins for the files
they name (toy models from ``autoguide toy --quick``, random detector weights, a few images)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoguide_fast.cli import build_parser
from autoguide_fast.metrics.inception import InceptionV3

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", README, flags=re.S | re.M)


def _command_lines() -> list[str]:
    lines = []
    for block in _blocks("sh"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("autoguide "):
                lines.append(line[len("autoguide ") :])
            elif "-m autoguide_fast.cli " in line:
                lines.append(line.split("-m autoguide_fast.cli ", 1)[1])
    return lines


def _variants(line: str) -> list[list[str]]:
    """The line without its [optional] groups, then with each alternative of each group."""
    groups = re.findall(r"\[([^\[\]]*)\]", line)
    base = re.sub(r"\s*\[[^\[\]]*\]", "", line)
    out = [base]
    for g in groups:
        out += [f"{base} {alt.strip()}" for alt in g.split(" | ")]
    return [shlex.split(v) for v in out]


def test_readme_names_many_commands():
    names = {line.split()[0] for line in _command_lines()}
    assert {"toy", "train", "ema", "generate", "sweep", "metrics", "presets", "convert"} <= names


@pytest.mark.parametrize("line", _command_lines())
def test_readme_command_lines_parse(line):
    for argv in _variants(line):
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README line does not parse: autoguide {' '.join(argv)} (exit {e.code})")


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = _blocks("python")
    first, metrics = blocks[0], next(b for b in blocks if "ag.metrics" in b)
    # The first block's models: `autoguide toy` writes them (make demo runs it; --quick for speed).
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "autoguide_fast.cli",
            "toy",
            "--quick",
            "--seeds",
            "1",
            "--out",
            "runs/toy",
            "--no-progress",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(
        compile(
            first.replace("range(1024)", "range(64)").replace("progress=True", "progress=False"),
            "README",
            "exec",
        ),
        scope,
    )
    assert scope["x"].shape == (64, 2) and torch.isfinite(scope["x"]).all()

    # The metrics block: random Inception weights, a reference of the right size, a few images.
    g = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=g) * 0.02 if v.is_floating_point() else v
        for k, v in InceptionV3().state_dict().items()
    }
    state.update({k: torch.ones_like(v) for k, v in state.items() if k.endswith("running_var")})
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    monkeypatch.setenv("AUTOGUIDE_INCEPTION", str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3000, 2048))
    from autoguide_fast.metrics import save_ref

    save_ref({"fid": {"mu": a.mean(0), "sigma": np.cov(a, rowvar=False)}}, tmp_path / "img512.pkl")
    (tmp_path / "fid-images").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / "fid-images" / f"{i}.png"
        )
    scope = {}
    exec(compile(metrics, "README", "exec"), scope)
    assert scope["stats"]["num_images"] == 4 and np.isfinite(scope["stats"]["fid"]["sigma"]).all()
    assert scope["fid"](torch.from_numpy(rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)))["fid"] > 0
