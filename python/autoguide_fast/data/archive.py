"""Reading zip entries with bounds: an entry is inflated only up to what its own header says its
content can need (a 1 MB zip may declare, or hold, a 1 GiB entry)."""

from __future__ import annotations

import io
import zipfile

import numpy as np

__all__ = ["read_entry"]

# Zip entries are inflated only up to what their content can need: a 1 MB zip may declare (or
# hold) a 1 GiB entry. The bound comes from the entry's own header (PNG IHDR, .npy header), read
# first, else from a flat cap.
_MAX_ENTRY = 256 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _entry_limit(head: bytes) -> int:
    """Most bytes an entry that starts with ``head`` can legitimately hold."""
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        depth, color = head[24], head[25]
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color, 4)
        raw = h * (1 + (w * channels * max(depth, 1) + 7) // 8)  # filter byte + packed row
        return min(_MAX_ENTRY, raw + raw // 64 + (1 << 20))  # deflate's stored blocks + chunks
    if head.startswith(b"\x93NUMPY"):
        readers = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}
        try:
            shape, _, dtype = readers[head[6]](io.BytesIO(head[8:]))
            return min(_MAX_ENTRY, int(np.prod(shape)) * np.dtype(dtype).itemsize + 4096)
        except Exception:  # an unreadable header: the flat cap, and np.load refuses it later
            pass
    return _MAX_ENTRY


def read_entry(z: zipfile.ZipFile, name: str, where: str) -> bytes:
    """A zip entry's bytes, refused (ValueError naming it) when its declared or actual size is
    beyond what its header allows, before inflating it."""
    info = z.getinfo(name)
    with z.open(info) as f:
        head = f.read(512)
        limit = _entry_limit(head)
        if info.file_size > limit:
            raise ValueError(
                f"{where}: the entry declares {info.file_size} bytes, more than its content can hold "
                f"({limit}); refusing to inflate it (a damaged or hostile zip)"
            )
        data = head + f.read(limit + 1 - len(head))
    if len(data) > limit:
        raise ValueError(
            f"{where}: the entry inflates past {limit} bytes; refusing it (a damaged or hostile zip)"
        )
    return data
