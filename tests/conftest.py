import json
import os
import socket
from pathlib import Path

import pytest
from safetensors.torch import load_file

# The shared reference vectors sit next to the repository (../shared) on developer machines and in CI.
REFERENCE_DIR = Path(
    os.environ.get(
        "AUTOGUIDE_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference" / "edm2"
    )
)


def rel_err(ours, ref) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).norm() / ref.norm())


@pytest.fixture(scope="session")
def reference():
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference vectors not found at {REFERENCE_DIR} (set AUTOGUIDE_REFERENCE_DIR)")

    def get(name: str):
        path = REFERENCE_DIR / name
        return json.loads(path.read_text()) if name.endswith(".json") else load_file(path)

    return get


def free_port() -> int:
    """A free TCP port on the loopback interface (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
