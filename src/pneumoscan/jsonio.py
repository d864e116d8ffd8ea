"""JSON output shared by the CLI, reports, runs and model metadata."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    """Plain JSON values: NumPy scalars unwrapped, NaN (an undefined rate) as ``None``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def dumps(payload: Any) -> str:
    """Strict JSON text (no NaN) of ``payload``, indented."""
    return json.dumps(jsonable(payload), indent=2, allow_nan=False)


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as strict JSON; the file appears only once complete."""
    with atomic_write(path) as tmp:
        tmp.write_text(dumps(payload) + "\n")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """A temporary file beside ``path`` to write; it replaces ``path`` only when the block ends
    without an exception, and is removed otherwise, so ``path`` is never seen half written.

    The temporary name keeps ``path``'s suffix (Keras and NumPy insist on theirs); the
    parent folder is created; the file ends up readable by all (``0o644``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
