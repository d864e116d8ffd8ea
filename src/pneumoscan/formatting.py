"""How numbers are shown to people: thresholds never round to a misleading value."""

from __future__ import annotations

import math

#: Fewest decimals a threshold is shown with.
THRESHOLD_DECIMALS = 4
_MOST_DECIMALS = 10


def threshold_decimals(value: float, least: int = THRESHOLD_DECIMALS) -> int:
    """Decimals that show ``value`` without it rounding to 0 or 1 (at least ``least``).

    A threshold of 0.99996 at 4 decimals reads 1.0000, which says "nothing is flagged"; it
    gets 5 decimals instead.
    """
    value = float(value)
    if not math.isfinite(value):
        return least
    decimals = least
    while decimals < _MOST_DECIMALS:
        shown = round(value, decimals)
        if (shown >= 1.0 > value) or (shown <= 0.0 < value):
            decimals += 1
            continue
        break
    return decimals


def format_threshold(value: float | None, least: int = THRESHOLD_DECIMALS) -> str:
    """A threshold with at least ``least`` decimals, more where fewer would round it to 0 or
    1 (``0.9996`` -> ``0.9996``, ``0.99996`` -> ``0.99996``, ``0.5`` -> ``0.5000``)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.{threshold_decimals(value, least)}f}"


def format_probability(value: float, threshold: float | None = None, least: int = 3) -> str:
    """A probability with ``least`` decimals, or as many as the threshold is shown with, so
    one printed next to the other can be compared."""
    decimals = least if threshold is None else max(least, threshold_decimals(threshold))
    return f"{float(value):.{decimals}f}"
