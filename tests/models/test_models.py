"""Tests for the model registry (pneumoscan.models)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.models import create_model, get_spec, list_models


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_gives_two_class_softmax(name: str) -> None:
    spec = get_spec(name)
    model = create_model(name)
    height, width = spec.preprocess.image_size
    out = np.asarray(model.predict_on_batch(np.random.default_rng(0).random((2, height, width, 3))))
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_seed_is_exactly_the_notebook_network() -> None:
    model = create_model("seed")
    kinds = [layer.__class__.__name__ for layer in model.layers]
    assert kinds == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D",
        "Flatten", "Dense", "Dense",
    ]  # fmt: skip
    assert [layer.filters for layer in model.layers if hasattr(layer, "filters")] == [32, 32, 64]
    # 3x3 valid convolutions and 2x2 pooling on 224x224: 26x26x64 into Dense(64).
    assert model.count_params() == 896 + 9248 + 18496 + (26 * 26 * 64 * 64 + 64) + 130
    recipe = get_spec("seed").recipe
    assert (recipe.optimizer, recipe.loss, recipe.batch_size, recipe.epochs) == (
        "rmsprop", "binary_crossentropy", 16, 3,
    )  # fmt: skip
    assert get_spec("seed").preprocess.image_size == (224, 224)


def test_unknown_architecture_lists_known_ones() -> None:
    with pytest.raises(KeyError, match="seed"):
        get_spec("resnet9000")
