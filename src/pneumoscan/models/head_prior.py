"""Training features a model file carries for refitting its final layer at a new site.

``pneumoscan calibrate`` refits the final dense layer on the site's labelled sample together
with training images, which keep the refit from swinging to a small sample. A hospital does not
have our training data, so a seeded sample of the training images' pooled features (the dense
layer's input) and labels travels inside the model file, as float16.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.constants import DEFAULT_HEAD_PRIOR_IMAGES, DEFAULT_SEED, HEAD_PRIOR_MEMBER
from pneumoscan.errors import ModelFileError
from pneumoscan.models.modelfile import read_member, write_member


@dataclass(frozen=True)
class HeadPrior:
    """Pooled features ``(n, d)`` of training images and their 0/1 labels (1: PNEUMONIA)."""

    features: np.ndarray
    labels: np.ndarray

    def to_npz(self) -> bytes:
        """Compressed ``.npz`` bytes (features as float16)."""
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, features=self.features.astype(np.float16), labels=self.labels.astype(np.uint8)
        )
        return buffer.getvalue()

    @classmethod
    def from_npz(cls, data: bytes, source: str | Path = "model file") -> HeadPrior:
        """Read :meth:`to_npz` bytes.

        Raises:
            ModelFileError: The member is damaged or its arrays disagree.
        """
        try:
            with np.load(io.BytesIO(data)) as arrays:
                features = arrays["features"].astype(np.float64)
                labels = arrays["labels"].astype(int)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFileError(f"{source}: damaged {HEAD_PRIOR_MEMBER} ({exc})") from exc
        if features.ndim != 2 or len(features) != len(labels) or set(labels) - {0, 1}:
            raise ModelFileError(f"{source}: {HEAD_PRIOR_MEMBER} holds inconsistent arrays")
        return cls(features, labels)


def sample_head_prior(
    features: np.ndarray,
    labels: np.ndarray,
    n_images: int = DEFAULT_HEAD_PRIOR_IMAGES,
    seed: int = DEFAULT_SEED,
) -> HeadPrior:
    """A seeded sample of ``n_images`` rows (all of them when there are fewer)."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(labels), size=min(n_images, len(labels)), replace=False))
    return HeadPrior(np.asarray(features)[chosen], np.asarray(labels)[chosen])


def read_head_prior(path: str | Path) -> HeadPrior | None:
    """The head prior stored in a model file, or ``None`` when it carries none."""
    data = read_member(path, HEAD_PRIOR_MEMBER)
    return None if data is None else HeadPrior.from_npz(data, path)


def write_head_prior(path: str | Path, prior: HeadPrior) -> None:
    """Store ``prior`` in a model file (atomically)."""
    write_member(path, HEAD_PRIOR_MEMBER, prior.to_npz())
