"""The host allocator setting (autoguide_fast.allocator): freed blocks are reused, not returned
to the system and faulted in again at the next step."""

import os
import platform
import subprocess
import sys

import pytest

from autoguide_fast import allocator

# A process that makes 5 "steps" of 30 tensors of 3 MiB (a toy training step's sizes) and prints
# whether the allocator is tuned and the minor page faults of steps 2 to 5.
STEPS = """
import resource, torch
from autoguide_fast.allocator import keep_freed_memory
tuned = keep_freed_memory()
def step():
    ts = [torch.ones(768 * 1024) for _ in range(30)]
    del ts
step()
f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
"""


def _faults(mode: str) -> tuple[bool, int]:
    env = dict(os.environ, AUTOGUIDE_MALLOC=mode)
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True)
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)
def test_freed_memory_is_reused_not_faulted_in_again():
    # 4 steps of 90 MiB are 92,160 pages. The tuned allocator reuses the first step's memory
    # (measured: 5-8% of the pages are faulted in, alignment splits of freed blocks); glibc's
    # defaults return much of it to the system and fault it in again (25-100%, measured, varying
    # with its dynamic thresholds, so not asserted).
    pages = 4 * 30 * 768
    tuned, faults = _faults("reuse")
    assert tuned and faults < pages // 8
    assert _faults("system")[0] is False


def test_bad_setting_is_named(monkeypatch):
    allocator.keep_freed_memory.cache_clear()
    monkeypatch.setenv("AUTOGUIDE_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="AUTOGUIDE_MALLOC must be one of reuse, system, got 'jemalloc'"):
        allocator.keep_freed_memory()
    monkeypatch.setenv("AUTOGUIDE_MALLOC", "system")
    assert allocator.keep_freed_memory() is False
    monkeypatch.setenv("AUTOGUIDE_MALLOC", "reuse")
    assert allocator.keep_freed_memory() is False  # decided once per process
    allocator.keep_freed_memory.cache_clear()
