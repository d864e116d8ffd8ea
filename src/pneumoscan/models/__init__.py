"""Model registry; importing this package registers every architecture."""

from __future__ import annotations

from pneumoscan.models import seed  # noqa: F401  (registers "seed")
from pneumoscan.models.registry import (
    ModelSpec,
    Recipe,
    create_model,
    get_spec,
    list_models,
    register_model,
)

__all__ = ["ModelSpec", "Recipe", "create_model", "get_spec", "list_models", "register_model"]
