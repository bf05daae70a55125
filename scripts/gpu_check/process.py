"""One stage's process: its own process group under its own time limit, its output streamed into
gpu_check.log; at the limit, or when the check is interrupted, the whole group is stopped."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .common import PROG, ROOT

STAGE_LOG_CAP = 1536 << 10  # bytes of one stage's output kept in gpu_check.log (all of them < 16 MiB)


@dataclass
class Outcome:
    returncode: int | None  # None: stopped at its time limit
    seconds: float
    tail: str  # the last lines of its output


def run_process(
    cmd: list[str], limit_s: float, log: TextIO, env: dict[str, str], cwd: Path = ROOT
) -> Outcome:
    """Runs ``cmd`` in its own process group, its output streamed into ``log`` (up to STAGE_LOG_CAP
    bytes). At ``limit_s`` seconds, or when this process is interrupted, the whole group
    (compute-sanitizer's target too) gets SIGTERM, then SIGKILL."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    start = time.monotonic()
    # A group of its own inside this session: a run killed from outside takes the stage with it.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        **group,
    )
    tail: collections.deque[bytes] = collections.deque(maxlen=400)
    reader = threading.Thread(target=_pump, args=(proc, log, tail), daemon=True)
    reader.start()
    returncode = None
    try:
        returncode = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        log.write(f"[{PROG}: time limit of {limit_s:.0f} s reached: stopping the stage]\n")
    finally:
        kill_group(proc)
        reader.join(timeout=10)
        log.flush()
    return Outcome(returncode, time.monotonic() - start, b"".join(tail).decode(errors="replace"))


def _pump(proc: subprocess.Popen, log: TextIO, tail: collections.deque[bytes]) -> None:
    """Copies the stage's output into ``log`` (the first STAGE_LOG_CAP bytes) and ``tail``."""
    written = 0
    for line in iter(proc.stdout.readline, b""):
        tail.append(line)
        if written < STAGE_LOG_CAP:
            log.write(line.decode(errors="replace"))
            log.flush()
            written += len(line)
            if written >= STAGE_LOG_CAP:
                log.write(f"[{PROG}: the rest of this stage's output is left out of the log]\n")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL to what is left 5 s later. Also after a normal
    exit: nothing the stage started may keep the GPU."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(50):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.1)
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
