"""Tests for pneumoscan.data.pipeline: ordered streaming decode and reproducible epochs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneumoscan.data.pipeline import decode_all, epoch_order, iter_decoded_batches, training_batches
from pneumoscan.data.preprocess import PreprocessConfig, decode_to_uint8

from conftest import fixture_images


def test_stream_keeps_order_and_reports_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    good = [str(p) for p in fixture_images("NORMAL")[:5]]
    paths = [good[0], str(bad), *good[1:]]
    batches = list(iter_decoded_batches(paths, PreprocessConfig(), batch_size=2))
    assert len(batches) == 3
    indices = [i for b in batches for i in b.indices]
    assert indices == [0, 2, 3, 4, 5]
    errors = [e for b in batches for e in b.errors]
    assert errors[0][0] == 1 and str(bad) in errors[0][1].message
    assert errors[0][1].path == str(bad) and errors[0][1].error_type == "ImageReadError"
    np.testing.assert_array_equal(batches[1].pixels[0], decode_to_uint8(good[1]))


def test_decode_all_skips_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "zero.jpeg"
    bad.write_bytes(b"")
    paths = [str(p) for p in fixture_images("PNEUMONIA")[:3]] + [str(bad)]
    seen: list[int] = []
    pixels, kept, errors = decode_all(paths, PreprocessConfig(), on_progress=seen.append)
    assert pixels.shape == (3, 224, 224, 3) and pixels.dtype == np.uint8
    assert kept.tolist() == [0, 1, 2] and errors[0][0] == 3
    assert sum(seen) == 4


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    np.testing.assert_array_equal(epoch_order(50, 3, 2), epoch_order(50, 3, 2))
    assert not np.array_equal(epoch_order(50, 3, 2), epoch_order(50, 3, 3))


def test_resumed_batches_equal_uninterrupted_ones() -> None:
    pixels = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    labels = np.array([0, 1] * 5)
    full = list(training_batches(pixels, labels, 4, seed=7, start_epoch=0, epochs=3))
    resumed = list(training_batches(pixels, labels, 4, seed=7, start_epoch=1, epochs=3))
    assert len(full) == 9 and len(resumed) == 6
    for (x1, y1), (x2, y2) in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    x, y = full[0]
    assert x.dtype == np.float32 and x.max() <= 1.0 and y.shape == (4, 2)
