"""Training-time augmentation that imitates other scanners and positioning.

The augmenter is a Keras model of random layers (backend-agnostic) placed in front of the
network during training only; the shipped network never contains it. At a new hospital the
X-rays differ in exposure, contrast, sharpness, noise and framing (how much border and arm
shows), so those are what the augmenter varies.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import layers, ops

AUGMENTATIONS = ("none", "xray", "xray_border")
WRAPPER_NAME = "with_augmentation"


@keras.saving.register_keras_serializable(package="pneumoscan")
class RandomGamma(layers.Layer):
    """Raise [0, 1] images to a random power in ``[1/max_gamma, max_gamma]`` (exposure curve).

    Args:
        max_gamma: Largest gamma (> 1); the log of gamma is drawn uniformly.
        seed: Seed of the layer's random stream.
    """

    def __init__(self, max_gamma: float = 1.5, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_gamma = max_gamma
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training:
            return images
        batch = ops.shape(images)[0]
        log_max = math.log(self.max_gamma)
        log_gamma = keras.random.uniform(
            (batch, 1, 1, 1), -log_max, log_max, seed=self.seed_generator
        )
        return ops.power(ops.clip(images, 1e-6, 1.0), ops.exp(log_gamma))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {"max_gamma": self.max_gamma, "seed": self.seed}


@keras.saving.register_keras_serializable(package="pneumoscan")
class RandomBorderMask(layers.Layer):
    """Black out a band of random width along each edge, independently, on a random share of
    the images (both classes alike).

    Collimation, cropping and padding differ between hospitals; in the training data black
    borders are more common on one class, and the shortcut audit showed a model that reads
    them (masking the border raised normal images' P(pneumonia) by 0.45 on the site sample).

    Args:
        rate: Share of images that get masked.
        max_share: Largest band, as a share of the height or width.
        seed: Seed of the layer's random stream.
    """

    def __init__(
        self, rate: float = 0.5, max_share: float = 0.12, seed: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.rate = rate
        self.max_share = max_share
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training:
            return images
        shape = ops.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        bands = keras.random.uniform((batch, 4), 0.0, self.max_share, seed=self.seed_generator)
        chosen = keras.random.uniform((batch, 1), seed=self.seed_generator) < self.rate
        bands = ops.where(chosen, bands, ops.zeros_like(bands))
        rows = (ops.arange(height, dtype="float32") + 0.5) / ops.cast(height, "float32")
        cols = (ops.arange(width, dtype="float32") + 0.5) / ops.cast(width, "float32")
        top, bottom, left, right = (bands[:, i][:, None] for i in range(4))
        keep_rows = (rows[None, :] >= top) & (rows[None, :] <= 1.0 - bottom)
        keep_cols = (cols[None, :] >= left) & (cols[None, :] <= 1.0 - right)
        keep = ops.logical_and(keep_rows[:, :, None], keep_cols[:, None, :])
        return images * ops.cast(keep[..., None], images.dtype)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return super().get_config() | {
            "rate": self.rate,
            "max_share": self.max_share,
            "seed": self.seed,
        }


@keras.saving.register_keras_serializable(package="pneumoscan")
class ClipUnit(layers.Layer):
    """Clip to [0, 1] so the network sees the value range it is fed at inference."""

    def call(self, images: Any) -> Any:
        return ops.clip(images, 0.0, 1.0)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


def build_augmenter(name: str, seed: int) -> keras.Sequential | None:
    """The named augmentation pipeline, or ``None`` for ``none``.

    Raises:
        ValueError: Unknown name.
    """
    if name == "none":
        return None
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; choose one of {AUGMENTATIONS}")
    border = [RandomBorderMask(0.5, 0.12, seed=seed + 8)] if name == "xray_border" else []
    return keras.Sequential(
        [
            # Framing: zoom in and out (black fill imitates collimation), shift, tilt.
            layers.RandomZoom((-0.15, 0.15), fill_mode="constant", seed=seed),
            layers.RandomTranslation(0.06, 0.06, fill_mode="constant", seed=seed + 1),
            layers.RandomRotation(0.02, fill_mode="constant", seed=seed + 2),
            # Exposure and contrast.
            RandomGamma(1.4, seed=seed + 3),
            layers.RandomContrast(0.3, seed=seed + 4),
            layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=seed + 5),
            # Sharpness and noise of other detectors.
            layers.RandomGaussianBlur(
                factor=0.5, sigma=(0.1, 1.0), value_range=(0.0, 1.0), seed=seed + 6
            ),
            layers.GaussianNoise(0.02, seed=seed + 7),
            *border,
            ClipUnit(),
        ],
        name="augmenter",
    )


def wrap_for_training(network: keras.Model, augmenter: keras.Sequential | None) -> keras.Model:
    """``augmenter -> network`` as one trainable model (or the network itself)."""
    if augmenter is None:
        return network
    inputs = keras.Input(shape=network.input_shape[1:])
    return keras.Model(inputs, network(augmenter(inputs)), name=WRAPPER_NAME)


def unwrap(model: keras.Model) -> keras.Model:
    """The network inside a model built by :func:`wrap_for_training`."""
    if model.name != WRAPPER_NAME:
        return model
    return next(
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and layer.name != "augmenter"
    )
