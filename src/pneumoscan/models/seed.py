"""The original notebook's CNN, kept as the ``seed`` baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pneumoscan.models.registry import Recipe, register_model

if TYPE_CHECKING:
    import keras


@register_model(
    "seed",
    description="The notebook's CNN: Conv32-Pool-Conv32-Pool-Conv64-Pool-Flatten-Dense64-Dense2.",
    # bfloat16 compute trains it 1.7x faster on a CPU with AVX512_BF16 at the same validation
    # AUC (measured: README, "train"); EfficientNet-Lite0 is slower in bfloat16, so not there.
    recipe=Recipe(
        optimizer="rmsprop",
        loss="binary_crossentropy",
        batch_size=16,
        epochs=3,
        precision="mixed_bfloat16",
    ),
)
def seed_cnn(input_shape: tuple[int, int, int], num_classes: int = 2) -> keras.Model:
    """Build the notebook's network exactly (3x3 valid convolutions, 2x2 max pooling, softmax).

    Args:
        input_shape: ``(height, width, channels)``.
        num_classes: Width of the softmax output.
    """
    import keras  # lazy: loads TensorFlow
    from keras import layers  # lazy: loads TensorFlow

    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            # float32 softmax under mixed precision: bfloat16 probabilities tie near 0 and 1.
            layers.Dense(num_classes, activation="softmax", dtype="float32"),
        ],
        name="seed",
    )
