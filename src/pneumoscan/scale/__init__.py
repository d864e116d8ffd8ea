"""Scoring past one process: ``pneumoscan predict --engine ray`` (the ``ray`` extra)."""
