"""What every part of the check shares: where the repository is, how it speaks, the two ways a
run ends early, and how it writes a file."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # `python -m <its name>` from its parent runs the check
ROOT = PACKAGE_DIR.parents[1]  # the repository: pip and pytest run here, the wheel is in its dist/
PROG = "gpu-check"
REQUIRED = ("torch", "numpy", "safetensors", "tqdm")  # without these nothing runs


class SetupError(Exception):
    """A problem with what the check was given (arguments, wheel, packages): exit status 2."""


class Interrupted(BaseException):
    """SIGTERM (a time limit from outside): the report is written, then exit status 130."""


def say(text: str) -> None:
    print(f"{PROG}: {text}", flush=True)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def write_atomic(path: Path, text: str) -> None:
    """Through a temporary file in the same folder and a rename: a reader, or a run killed
    mid-write, sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
