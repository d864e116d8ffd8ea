"""``python -m pneumoscan``."""

from __future__ import annotations

from pneumoscan.cli import run

run()
