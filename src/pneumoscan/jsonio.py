"""JSON output shared by the CLI, reports, runs and model metadata."""

from __future__ import annotations

import json
import math
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(payload) + "\n")
    tmp.replace(path)
