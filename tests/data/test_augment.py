"""Tests for pneumoscan.data.augment: random in training, identity at inference, saved and
restored."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from pneumoscan.data.augment import build_augmenter, unwrap, wrap_for_training
from pneumoscan.data.preprocess import preprocess_image
from pneumoscan.models import create_model

from conftest import fixture_images


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.stack([preprocess_image(p) for p in fixture_images("NORMAL")[:4]])


def test_xray_augmentation_changes_images_but_keeps_range(batch: np.ndarray) -> None:
    augmenter = build_augmenter("xray", seed=1)
    assert augmenter is not None
    first = np.asarray(augmenter(batch, training=True))
    second = np.asarray(augmenter(batch, training=True))
    assert first.shape == batch.shape
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert np.abs(first - batch).mean() > 0.01
    assert np.abs(first - second).mean() > 0.01  # a fresh draw every call
    np.testing.assert_array_equal(np.asarray(augmenter(batch, training=False)), batch)


def test_wrapper_saves_restores_and_unwraps(batch: np.ndarray, tmp_path: Path) -> None:
    network = create_model("seed")
    wrapped = wrap_for_training(network, build_augmenter("xray", seed=2))
    wrapped.compile(optimizer="rmsprop", loss="binary_crossentropy")
    path = tmp_path / "wrapped.keras"
    wrapped.save(path)
    restored = keras.saving.load_model(path)
    inner = unwrap(restored)
    assert inner.name == "seed" and len(inner.layers) == len(network.layers)
    np.testing.assert_allclose(
        np.asarray(inner.predict_on_batch(batch)),
        np.asarray(network.predict_on_batch(batch)),
        atol=1e-6,
    )
    assert unwrap(network) is network
    assert wrap_for_training(network, build_augmenter("none", seed=0)) is network


def test_unknown_augmentation_is_refused() -> None:
    with pytest.raises(ValueError, match="xray"):
        build_augmenter("heavy", seed=0)


def test_border_mask_blacks_out_edge_bands_only_while_training(batch: np.ndarray) -> None:
    from pneumoscan.data.augment import RandomBorderMask

    images = np.ones((16, 64, 64, 3), np.float32)
    masked = np.asarray(RandomBorderMask(rate=1.0, max_share=0.25, seed=3)(images, training=True))
    assert masked.min() == 0.0 and masked.max() == 1.0
    assert np.all(masked[:, 20:44, 20:44] == 1.0)  # the centre is never touched
    zeros = masked[..., 0] == 0
    for image in zeros:  # what is masked are whole rows or columns at the edges
        rows, cols = image.all(axis=1), image.all(axis=0)
        assert np.array_equal(image, rows[:, None] | cols[None, :])
    assert len({zeros[i].sum() for i in range(16)}) > 4  # random band widths
    untouched = RandomBorderMask(rate=0.0, seed=3)(images, training=True)
    np.testing.assert_array_equal(np.asarray(untouched), images)
    np.testing.assert_array_equal(np.asarray(RandomBorderMask(1.0)(images)), images)
    augmenter = build_augmenter("xray_border", seed=4)
    assert augmenter is not None and "random_border_mask" in augmenter.layers[-2].name
    out = np.asarray(augmenter(batch, training=True))
    assert out.min() >= 0.0 and out.max() <= 1.0
