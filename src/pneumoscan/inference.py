"""Scoring: a pure function from decoded images to P(pneumonia), and a streaming file scorer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pneumoscan.calibration import apply_temperature
from pneumoscan.constants import POSITIVE_INDEX
from pneumoscan.modelfile import LoadedModel
from pneumoscan.pipeline import iter_decoded_batches
from pneumoscan.preprocess import to_model_input


def p_pneumonia(model: LoadedModel, pixels: np.ndarray, calibrated: bool = True) -> np.ndarray:
    """P(pneumonia) for a batch of decoded uint8 images ``(n, H, W, 3)``.

    Pure in its inputs (no I/O), so a cluster engine can map it over batches unchanged.

    Args:
        model: The loaded model.
        pixels: Output of :func:`pneumoscan.preprocess.decode_to_uint8`, stacked.
        calibrated: Apply the temperature stored in the model (``False`` gives the network's
            raw softmax, which calibration fits on).
    """
    if len(pixels) == 0:
        return np.zeros(0, dtype=np.float64)
    expected = tuple(model.preprocess.image_size)
    if tuple(pixels.shape[1:3]) != expected:
        raise ValueError(f"images are {pixels.shape[1:3]}, the model expects {expected}")
    probabilities = np.asarray(model.network.predict_on_batch(to_model_input(pixels)))
    raw = probabilities[:, POSITIVE_INDEX].astype(np.float64)
    return apply_temperature(raw, model.temperature) if calibrated else raw


@dataclass
class FileScore:
    """The outcome for one file: a probability, or the reason there is none."""

    position: int
    path: str
    probability: float | None
    error: str | None


def score_files(
    model: LoadedModel, paths: Sequence[str], batch_size: int = 32, calibrated: bool = True
) -> Iterator[FileScore]:
    """Score files in input order, streaming; unreadable files yield an error, not an exception."""
    for batch in iter_decoded_batches(paths, model.preprocess, batch_size=batch_size):
        p = p_pneumonia(model, batch.pixels, calibrated=calibrated)
        scores = dict(zip(batch.indices, p, strict=True))
        messages = dict(batch.errors)
        for position in sorted([*scores, *messages]):
            probability = scores.get(position)
            yield FileScore(
                position=position,
                path=paths[position],
                probability=None if probability is None else float(probability),
                error=messages.get(position),
            )
