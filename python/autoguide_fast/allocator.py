"""Host memory: glibc's malloc tuned to keep freed blocks for reuse.

By default glibc serves every allocation above a (dynamic) threshold of 128 KiB to 32 MiB with
a fresh ``mmap`` and gives the pages back on ``free``, so a CPU computation that allocates tensors
of a few MB per operation (the toy's training step, EDM2 activations) page-faults and zeroes all
of its memory again at every step; with 2 cores that was half of the toy step's time (83 ms
against 38 ms, measured). PyTorch's CPU tuning guide recommends jemalloc or tcmalloc through
``LD_PRELOAD`` for this reason; :func:`keep_freed_memory` gets the same effect from glibc
itself, inside the process: blocks below ``MMAP_THRESHOLD`` come from the heap and freed memory
up to ``TRIM_THRESHOLD`` is kept for the next step. The process's resident memory then stays
near its peak instead of shrinking between steps.

``AUTOGUIDE_MALLOC``: ``reuse`` (the default) tunes glibc so; ``system`` leaves its settings as
they are. Other C libraries (macOS, musl) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Allocations below this come from the heap (an EDM2 activation at batch 64 is 30-70 MB).
MMAP_THRESHOLD = 256 << 20
# Free memory at the top of the heap kept for reuse rather than returned to the system.
TRIM_THRESHOLD = 1 << 30


@functools.cache  # once per process (a second concurrent first call would only repeat mallopt)
def keep_freed_memory() -> bool:
    """Tunes glibc's malloc once per process (see the module's text); True where it is tuned.
    Cheap to call again: the library calls it at the start of its long CPU jobs."""
    return _apply()


_MODES = ("reuse", "system")


def _apply() -> bool:
    mode = os.environ.get("AUTOGUIDE_MALLOC", "reuse").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"AUTOGUIDE_MALLOC must be one of {', '.join(_MODES)}, got {mode!r}")
    if mode == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. Some glibc versions refuse mmap thresholds above 32 MiB (half
    # their largest heap): then 32 MiB, which still covers the toy's and most EDM2 tensors.
    mmap = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(mmap and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
