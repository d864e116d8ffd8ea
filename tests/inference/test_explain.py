"""Grad-CAM heatmaps and their overlays, on the shipped model and real X-rays."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumoscan.data.preprocess import decode_to_uint8
from pneumoscan.inference.explain import (
    feature_map_layers,
    gradcam,
    heatmap_title,
    last_conv_layer,
    overlay_png,
)
from pneumoscan.inference.prediction import Prediction
from pneumoscan.inference.scorer import p_pneumonia
from pneumoscan.models.modelfile import LoadedModel, load_model

from conftest import fixture_images


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model()


@pytest.fixture(scope="module")
def xrays() -> np.ndarray:
    """Two NORMAL and two PNEUMONIA fixture X-rays, decoded."""
    paths = fixture_images("NORMAL")[:2] + fixture_images("PNEUMONIA")[:2]
    return np.stack([decode_to_uint8(p) for p in paths])


def _decisions(model: LoadedModel, xrays: np.ndarray) -> np.ndarray:
    return (p_pneumonia(model, xrays) >= model.threshold).astype(int)


def test_heatmaps_have_the_image_size_are_finite_and_bounded(
    model: LoadedModel, xrays: np.ndarray
) -> None:
    maps = gradcam(model.network, xrays, class_index=_decisions(model, xrays))
    assert maps.shape == (4, 224, 224) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    assert (maps.reshape(4, -1).max(axis=1) > 0.5).all()  # each scaled by its own peak


def test_heatmap_follows_the_input(model: LoadedModel, xrays: np.ndarray) -> None:
    classes = _decisions(model, xrays)
    maps = gradcam(model.network, xrays, class_index=classes)
    again = gradcam(model.network, xrays[::-1], class_index=classes[::-1])[::-1]
    np.testing.assert_allclose(maps, again, atol=1e-5)  # per image, whatever the batch order
    pneumonia = gradcam(model.network, xrays[2:])  # default: evidence for PNEUMONIA
    assert np.abs(pneumonia[0] - pneumonia[1]).mean() > 0.02  # another X-ray, another map
    mirrored = gradcam(model.network, xrays[2:3, :, ::-1])[0]
    assert np.abs(mirrored - pneumonia[0]).mean() > 0.02  # the map moves with the image


def test_normal_and_pneumonia_evidence_differ(model: LoadedModel, xrays: np.ndarray) -> None:
    normal, pneumonia = (gradcam(model.network, xrays[2:3], class_index=c)[0] for c in (0, 1))
    assert np.abs(normal - pneumonia).mean() > 0.02


def test_float_input_matches_uint8(model: LoadedModel, xrays: np.ndarray) -> None:
    np.testing.assert_allclose(
        gradcam(model.network, xrays[2:3]),
        gradcam(model.network, xrays[2:3].astype(np.float32) / 255.0),
        atol=1e-5,
    )


def test_target_layer_is_found_for_any_architecture() -> None:
    import keras

    inputs = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.MaxPooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    plain = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    assert last_conv_layer(plain) == "relu"  # after the conv, before pooling
    assert feature_map_layers(plain) == ["conv_a", "bn", "relu"]
    named = keras.layers.ReLU(name="top_activation")(keras.layers.Conv2D(4, 3)(inputs))
    x = keras.layers.Conv2D(4, 1, name="later")(named)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    preferred = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))
    assert last_conv_layer(preferred) == "top_activation"
    maps = gradcam(preferred, np.zeros((1, 64, 64, 3), np.uint8))
    assert maps.shape == (1, 64, 64) and np.isfinite(maps).all()
    dense_only = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no 4-D"):
        last_conv_layer(dense_only)


def test_overlay_png_draws_at_the_image_aspect(
    model: LoadedModel, xrays: np.ndarray, tmp_path: Path
) -> None:
    heatmap = gradcam(model.network, xrays[2:3])[0]
    wide = np.asarray(Image.fromarray(xrays[2]).resize((600, 400)))
    target = tmp_path / "overlay.png"
    title = heatmap_title("x.jpeg", Prediction.scored(0.873, 0.5))
    data = overlay_png(wide, heatmap, title, target)
    assert target.read_bytes() == data
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.width > image.height
    pixels = np.asarray(image.convert("RGB")).astype(int)
    colour = (pixels.max(axis=2) - pixels.min(axis=2)) > 40
    assert colour.mean() > 0.02  # the heatmap is drawn in colour over the grey X-ray
