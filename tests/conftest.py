import json
import os
import socket
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

# The reference vectors of the official code ship with the tests (tests/data/edm2, see its README.md), so
# `make test` passes in a clone alone; AUTOGUIDE_REFERENCE_DIR points the tests at another copy.
_SHIPPED = Path(__file__).resolve().parent / "data" / "edm2"
REFERENCE_DIR = Path(os.environ.get("AUTOGUIDE_REFERENCE_DIR", _SHIPPED))


def rel_err(ours, ref) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).norm() / ref.norm())


@pytest.fixture(scope="session")
def reference():
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"no reference vectors at {REFERENCE_DIR} (AUTOGUIDE_REFERENCE_DIR overrides {_SHIPPED})")

    def get(name: str):
        path = REFERENCE_DIR / name
        return json.loads(path.read_text()) if name.endswith(".json") else load_file(path)

    return get


def free_port() -> int:
    """A free TCP port on the loopback interface (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cli(nproc: int = 2) -> list[str]:
    """The command that runs ``autoguide`` in ``nproc`` processes under torchrun on this host."""
    return [*torchrun(nproc), "-m", "autoguide_fast.cli"]


def torchrun(nproc: int = 2) -> list[str]:
    """torchrun's command for ``nproc`` processes on this host (a script or ``-m`` module follows)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
    ]
