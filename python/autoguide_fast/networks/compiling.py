"""``torch.compile`` failing at a call: one warning naming what failed, then the eager path."""

from __future__ import annotations

import warnings


def warn_compile_failure(what: str, error: Exception, stacklevel: int) -> None:
    """Warns that compiling ``what`` failed with ``error`` (its type and first line) and that it
    runs uncompiled; ``stacklevel`` as ``warnings.warn``'s, counted from the caller."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    warnings.warn(
        f"autoguide_fast: compiling {what} failed ({type(error).__name__}: {first}); it runs uncompiled",
        stacklevel=stacklevel + 1,
    )
