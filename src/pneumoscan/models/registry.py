"""A registry of architectures whose spec carries preprocessing and training recipe.

Modelled on timm's ``@register_model``: a model is looked up by name, and its spec says which
input it expects, so the preprocessing stored in a trained model always matches training.
Keras is imported by the builders only, so listing the registry stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pneumoscan.data.preprocess import PreprocessConfig

if TYPE_CHECKING:
    import keras


BATCHNORM_MODES = ("trainable", "frozen")
SELECTION_METRICS = ("val_auc", "val_loss")


@dataclass(frozen=True)
class Recipe:
    """Default training recipe of an architecture (every field can be overridden by the CLI).

    Attributes:
        optimizer: Keras optimizer name.
        learning_rate: Initial learning rate; ``None`` keeps the optimizer's default.
        loss: Keras loss name applied to the one-hot softmax output.
        batch_size: Images per step.
        epochs: Passes over the training split.
        class_weight: ``balanced`` weights classes inversely to their counts; ``none`` does not.
        restore_best: Keep the epoch with the best validation AUC instead of the last one.
        augment: Training-time augmentation (``none`` or ``xray``; see ``pneumoscan.data.augment``).
        label_smoothing: Label smoothing of the cross-entropy (0 = none).
        schedule: ``constant`` learning rate, or ``cosine`` decay to 0 over the run.
        precision: Keras dtype policy while training: ``float32``, or ``mixed_bfloat16``
            (bfloat16 compute, float32 weights). The saved model is always float32.
        batchnorm: ``trainable`` batch normalisation (statistics re-estimated on training
            batches), or ``frozen`` (inference mode throughout: pretrained statistics and
            affine parameters kept).
        select_on: Which validation figure picks the restored epoch: ``val_auc`` (highest) or
            ``val_loss`` (lowest).
        frozen_blocks: The stem and this many first blocks keep their pretrained weights (0:
            none): low-level filters learned on ImageNet stay generic instead of fitting one
            hospital's detector and processing.
        subtype_weight: Weight of the bacterial-or-viral head's loss (0: no such head). The
            head shares the backbone and sees only pneumonia images whose file names name the
            cause (:mod:`pneumoscan.models.subtype`).
    """

    optimizer: str = "rmsprop"
    learning_rate: float | None = None
    loss: str = "binary_crossentropy"
    batch_size: int = 16
    epochs: int = 3
    class_weight: str = "none"
    restore_best: bool = False
    augment: str = "none"
    label_smoothing: float = 0.0
    schedule: str = "constant"
    precision: str = "float32"
    batchnorm: str = "trainable"
    select_on: str = "val_auc"
    frozen_blocks: int = 0
    subtype_weight: float = 0.0

    def validate(self) -> None:
        """Refuse values no training step understands.

        Raises:
            ValueError: A field names an unknown choice; the message lists the known ones.
        """
        choices = {
            "batchnorm": BATCHNORM_MODES,
            "select_on": SELECTION_METRICS,
            "schedule": ("constant", "cosine"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"recipe {name}={getattr(self, name)!r}; choose one of {allowed}")
        if self.frozen_blocks < 0:
            raise ValueError(f"recipe frozen_blocks={self.frozen_blocks}; must be 0 or more")
        if not self.subtype_weight >= 0.0:
            raise ValueError(f"recipe subtype_weight={self.subtype_weight}; must be 0 or more")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build and feed one registered architecture."""

    name: str
    builder: Callable[..., keras.Model]
    description: str
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    recipe: Recipe = field(default_factory=Recipe)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    description: str,
    preprocess: PreprocessConfig | None = None,
    recipe: Recipe | None = None,
) -> Callable[[Callable[..., keras.Model]], Callable[..., keras.Model]]:
    """Decorator that registers a model builder ``fn(input_shape, num_classes) -> keras.Model``."""

    def decorate(builder: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            description=description,
            preprocess=preprocess or PreprocessConfig(),
            recipe=recipe or Recipe(),
        )
        return builder

    return decorate


def list_models() -> list[str]:
    """Names of the registered architectures, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """Return the spec of a registered architecture.

    Raises:
        KeyError: Unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; choose one of {list_models()}") from None


def create_model(name: str, num_classes: int = 2) -> keras.Model:
    """Build an untrained model of a registered architecture at its spec's input size."""
    spec = get_spec(name)
    height, width = spec.preprocess.image_size
    return spec.builder(
        input_shape=(height, width, spec.preprocess.channels), num_classes=num_classes
    )
