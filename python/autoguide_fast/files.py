"""How the package writes and checks files: atomic writes (temporary file in the destination's
folder, fsync, rename), the stale-temporary rule, regular-file checks before reading or
replacing, strict JSON, and figures. Every file the package writes goes through
:func:`atomic_path`."""

from __future__ import annotations

import builtins
import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ._core import AutoguideError

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "check_regular_file",
    "check_replaceable",
    "file_identity",
    "figure",
    "remove_stale_temporaries",
    "save_figure",
    "strict_json",
]


def check_regular_file(path: Path) -> None:
    """Raises FileNotFoundError, IsADirectoryError, or AutoguideError when ``path`` is not a
    regular file (a FIFO or device would block or be clobbered): every reader checks first."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise AutoguideError(f"{path} is not a regular file (a pipe, socket or device); refused")


def umask() -> int:
    """The process's umask (read without changing it for longer than two calls)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_replaceable(path: Path) -> None:
    """Raises unless ``path`` is absent or a regular file (a device, FIFO or directory is never
    replaced by a write)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path} is a directory; refusing to write over it")
    if not stat.S_ISREG(st.st_mode):
        raise AutoguideError(
            f"{path} is not a regular file (a pipe, socket or device); refusing to replace it"
        )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """The one way the package writes a file: yields a temporary path in the destination's
    directory (``.<name>.<random>.<pid>.tmp``); when the block succeeds the file is fsynced, given
    the mode the umask allows, and renamed over ``path``; when it fails the temporary is removed.
    A crash leaves the old file or the new one, never half of one, and :func:`remove_stale_temporaries`
    recognises the temporaries of a dead process. ``fsync=False`` (many small files that can be
    made again, e.g. generated images) keeps the rename's atomicity against a dying process but
    not against a power failure."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{os.getpid()}.tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with builtins.open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def figure(**kwargs):
    """A new matplotlib ``Figure`` (``figsize=...`` and the other ``Figure`` arguments), made
    without pyplot: no backend is chosen and no global figure list grows, so library code never
    changes matplotlib's state. Write it with :func:`save_figure`."""
    from matplotlib.figure import Figure  # heavy, and only figures need it: imported on first use

    return Figure(**kwargs)


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, rect=None) -> None:
    """Lays out a figure from :func:`figure` (``tight_layout``, within ``rect`` if given) and
    writes it atomically to ``path`` in the format its suffix names (PNG without one)."""
    fig.tight_layout(**({} if rect is None else dict(rect=rect)))
    with atomic_path(path) as tmp:  # the temporary ends in .tmp: name the format
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=dpi)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def strict_json(value, **kwargs) -> str:
    """JSON that other tools read: infinities become null (e.g. an open guidance interval); NaN
    is refused."""

    def clean(v):
        if isinstance(v, float) and math.isinf(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), allow_nan=False, **kwargs)


def file_identity(path: str | os.PathLike) -> list:
    """[name, size, modification time in ns]: what cell caches key a file on (a changed file is
    another file)."""
    p = Path(path)
    st = p.stat()
    return [p.name, st.st_size, st.st_mtime_ns]


def remove_stale_temporaries(directory: str | os.PathLike) -> None:
    """Removes the temporaries (``.<name>.<pid>.tmp``, files or folders) that writers of this
    package left in ``directory`` when their process died; those of live processes stay."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for p in directory.glob(".*.tmp"):
        pid = p.name[: -len(".tmp")].rsplit(".", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
