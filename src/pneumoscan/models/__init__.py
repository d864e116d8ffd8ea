"""Model registry; importing this package registers every architecture."""

from __future__ import annotations

import pneumoscan.models.efficientnet_lite  # noqa: F401  (registers "efficientnet_lite0*")
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
