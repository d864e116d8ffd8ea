"""Input pipelines: threaded, streaming decode for inference and batches for training.

Decoding goes through :func:`pneumoscan.data.preprocess.decode_to_uint8`, scaling through
:func:`pneumoscan.data.preprocess.to_model_input`: the same two stages every path uses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from pneumoscan.constants import DEFAULT_WORKERS
from pneumoscan.data.preprocess import (
    DecodedImage,
    DecodeFailure,
    PreprocessConfig,
    decode_image,
    decode_to_uint8,
    to_model_input,
)

#: Batches decoded ahead of the consumer by :func:`iter_decoded`.
DEFAULT_PREFETCH = 2

T = TypeVar("T")


@dataclass
class DecodedBatch:
    """One batch of decoded images and the files that failed.

    Attributes:
        indices: Positions (in the input sequence) of the decoded images, in order.
        pixels: ``(len(indices), H, W, 3)`` uint8.
        errors: ``(position, failure)`` for each file that could not be decoded.
    """

    indices: list[int]
    pixels: np.ndarray
    errors: list[tuple[int, DecodeFailure]]


# Both decoders call decode_to_uint8 / decode_image through this module's names (tests
# replace them here to simulate decoder bugs).
def _decode_one(path: str, config: PreprocessConfig) -> np.ndarray | DecodeFailure:
    try:
        return decode_to_uint8(path, config)
    except Exception as exc:  # the per-file firewall: one file never ends training's decode
        return DecodeFailure.from_exception(path, exc)


def _collect(
    start: int, results: list[np.ndarray | DecodeFailure], config: PreprocessConfig
) -> DecodedBatch:
    indices, arrays, errors = [], [], []
    for offset, result in enumerate(results):
        if isinstance(result, DecodeFailure):
            errors.append((start + offset, result))
        else:
            indices.append(start + offset)
            arrays.append(result)
    height, width = config.image_size
    pixels = np.stack(arrays) if arrays else np.zeros((0, height, width, 3), np.uint8)
    return DecodedBatch(indices, pixels, errors)


def iter_decoded_batches(
    paths: Sequence[str],
    config: PreprocessConfig,
    batch_size: int = 32,
    workers: int = DEFAULT_WORKERS,
) -> Iterator[DecodedBatch]:
    """Decode files in order, batch by batch, one batch ahead of the consumer.

    Memory holds at most two batches whatever the number of files, and an unreadable file
    is reported in its batch's ``errors`` instead of stopping the stream.
    """
    decode = functools.partial(_decode_one, config=config)
    for start, results in _stream(paths, decode, batch_size, workers, prefetch=1):
        yield _collect(start, results, config)


def _decode(path: str, config: PreprocessConfig) -> DecodedImage | DecodeFailure:
    try:
        return decode_image(path, config)
    except Exception as exc:  # the per-file firewall: no file's content may end a run
        return DecodeFailure.from_exception(path, exc)


def iter_decoded(
    paths: Sequence[str],
    config: PreprocessConfig,
    batch_size: int = 32,
    workers: int = DEFAULT_WORKERS,
    prefetch: int = DEFAULT_PREFETCH,
) -> Iterator[tuple[int, list[DecodedImage | DecodeFailure]]]:
    """``(start, decoded image or failure per file)`` batch by batch, in order.

    ``workers`` threads decode up to ``prefetch`` batches ahead of the consumer (Pillow and
    the network release the GIL, so decoding overlaps scoring); memory holds at most
    ``prefetch + 1`` batches whatever the number of files.
    """
    yield from _stream(
        paths, functools.partial(_decode, config=config), batch_size, workers, prefetch
    )


def _stream(
    paths: Sequence[str],
    decode: Callable[[str], T],
    batch_size: int,
    workers: int,
    prefetch: int,
) -> Iterator[tuple[int, list[T]]]:
    """The one streaming decoder: ``(start, decode(path) per file)`` batch by batch, in order,
    ``workers`` threads running up to ``prefetch`` batches ahead of the consumer."""
    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: list[tuple[int, list[Future[T]]]] = []
        for start in starts:
            chunk = paths[start : start + batch_size]
            pending.append((start, [pool.submit(decode, p) for p in chunk]))
            if len(pending) > prefetch:
                first, futures = pending.pop(0)
                yield first, [future.result() for future in futures]
        for first, futures in pending:
            yield first, [future.result() for future in futures]


def decode_all(
    paths: Sequence[str],
    config: PreprocessConfig,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, DecodeFailure]]]:
    """Decode every file into one uint8 array (the training set's in-memory cache).

    Returns:
        ``(pixels, kept_positions, errors)``; ``pixels[i]`` is ``paths[kept_positions[i]]``.
    """
    height, width = config.image_size
    pixels = np.empty((len(paths), height, width, 3), np.uint8)
    kept: list[int] = []
    errors: list[tuple[int, DecodeFailure]] = []
    for batch in iter_decoded_batches(paths, config, batch_size=64):
        pixels[len(kept) : len(kept) + len(batch.indices)] = batch.pixels
        kept.extend(batch.indices)
        errors.extend(batch.errors)
        if on_progress:
            on_progress(len(batch.indices) + len(batch.errors))
    return pixels[: len(kept)], np.asarray(kept, dtype=int), errors


@dataclass(frozen=True)
class SecondTask:
    """Per-image targets and loss weights of a second network output, and the per-image
    weights of the first (which then replace Keras's ``class_weight``, single-output only)."""

    targets: np.ndarray
    weights: np.ndarray
    first_weights: np.ndarray


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of epoch ``epoch``: a function of (seed, epoch) only, so a resumed
    run sees exactly the batches an uninterrupted run would have seen."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def training_batches(
    pixels: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    start_epoch: int,
    epochs: int,
    num_classes: int = 2,
    targets: np.ndarray | None = None,
    second: SecondTask | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Yield ``(x float32 [0,1], y one-hot)`` batches for epochs ``start_epoch..epochs-1``.

    ``targets`` ``(n, num_classes)`` replaces the one-hot labels (soft targets, distillation).
    With ``second``, batches are ``(x, (y, second target), (weight, second weight))`` for a
    two-output network; the first output's weights are ``second.first_weights``.
    """
    eye = np.eye(num_classes, dtype=np.float32)
    y = eye[labels] if targets is None else np.asarray(targets, dtype=np.float32)
    for epoch in range(start_epoch, epochs):
        order = epoch_order(len(labels), seed, epoch)
        for start in range(0, len(order), batch_size):
            # Sorted gathers read a memory-mapped cache sequentially; order within a batch is
            # irrelevant to the gradient.
            chosen = np.sort(order[start : start + batch_size])
            if second is None:
                yield to_model_input(pixels[chosen]), y[chosen]
            else:
                yield (
                    to_model_input(pixels[chosen]),
                    (y[chosen], second.targets[chosen, None]),
                    (second.first_weights[chosen], second.weights[chosen]),
                )


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches per epoch (the last one may be short)."""
    return -(-n // batch_size)


def make_tf_dataset(
    pixels: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    start_epoch: int,
    epochs: int,
    targets: np.ndarray | None = None,
    second: SecondTask | None = None,
) -> object:
    """Wrap :func:`training_batches` in a prefetching ``tf.data.Dataset``.

    The batch source is plain NumPy, so another backend can feed the same generator directly.
    """
    import tensorflow as tf  # lazy: loads TensorFlow

    height, width = pixels.shape[1:3]
    images = tf.TensorSpec((None, height, width, 3), tf.float32)
    onehot = tf.TensorSpec((None, 2), tf.float32)
    signature: tuple[Any, ...] = (images, onehot)
    if second is not None:
        weight = tf.TensorSpec((None,), tf.float32)
        signature = (images, (onehot, tf.TensorSpec((None, 1), tf.float32)), (weight, weight))
    dataset = tf.data.Dataset.from_generator(
        lambda: training_batches(
            pixels, labels, batch_size, seed, start_epoch, epochs, targets=targets, second=second
        ),
        output_signature=signature,
    )
    return dataset.prefetch(tf.data.AUTOTUNE)
