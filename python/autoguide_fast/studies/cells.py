"""One cache of finished cells for every study: ``{key: result}`` in a JSON file, written
atomically after every new cell, so an interrupted study resumes where it stopped. A cell is keyed
on everything that determines its numbers; a file of another format (or made under another
``identity``) is set aside and every cell recomputed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from ..files import atomic_write_bytes, strict_json

__all__ = ["CellCache", "cell_key"]


def cell_key(settings: dict) -> str:
    """The key of a cell: a hash of everything that determines its numbers (JSON data)."""
    return hashlib.sha256(strict_json(settings, sort_keys=True).encode()).hexdigest()[:24]


class CellCache:
    """Finished cells ``{key: result}`` kept in the JSON file ``path``.

    Args:
        path: the cache file (read if present, written atomically after every new cell).
        identity: JSON data the whole file depends on (recipe, search space, package version,
            models); None when every key already holds everything (:func:`cell_key`).
        format: the file's format tag; a file of another tag is set aside.
        log: where "recomputed" notices go.
    """

    def __init__(self, path: Path, identity=None, format: str = "autoguide_fast.cells/1", log=print):
        self.path, self.identity, self.format, self.cells = Path(path), identity, format, {}
        if not self.path.is_file():
            return
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            log(f"{path}: unreadable ({e}); every cell is recomputed")
            return
        ok = isinstance(doc, dict) and doc.get("format") == format and isinstance(doc.get("cells"), dict)
        if ok and doc.get("identity") == identity:
            self.cells = doc["cells"]
        else:
            log(f"{path}: made under other settings or by another version; every cell is recomputed")

    def __contains__(self, key: str) -> bool:
        return key in self.cells

    def __getitem__(self, key: str) -> dict:
        return self.cells[key]

    def put(self, key: str, result: dict) -> None:
        """Keeps ``result`` under ``key`` and rewrites the file."""
        self.cells[key] = result
        doc = dict(format=self.format, cells=self.cells)
        if self.identity is not None:
            doc["identity"] = self.identity
        atomic_write_bytes(self.path, (strict_json(doc, indent=1) + "\n").encode())

    def get(self, key: str, compute: Callable[[], dict]) -> dict:
        """The cell ``key``, computed (and kept) if the cache does not hold it."""
        if key not in self.cells:
            self.put(key, compute())
        return self.cells[key]
