"""The subtype head: bacterial or viral, a second estimate for images decided PNEUMONIA.

The head is one logistic unit on the shared backbone's pooled features (the input of the
pneumonia layer, the OOD detector's network features). It is trained jointly with the
pneumonia head (the loss counts only pneumonia images), then stored in the model file's
metadata as plain numbers, so every backend scores it from the features its forward pass
already returns: the pneumonia network, its export and its decision are unchanged, and the
estimate costs one dot product per image.

What it is: an estimate from the X-ray of what the file names of the training hospital call
bacterial or viral. What it is not: a microbiological diagnosis. Co-infection is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from pneumoscan.errors import InvalidInputError, ModelFileError
from pneumoscan.models.modelfile import OperatingPoint

SUBTYPE_HEAD = "subtype"
BACTERIAL, VIRAL = "bacterial", "viral"
# File-name subtypes (pneumoscan.data.dataset.subtype_from_name) -> the head's target.
SUBTYPE_TARGETS = {"bacteria": 0, "virus": 1}
SUBTYPE_LABEL = "estimate, not a microbiological diagnosis"


def subtype_targets(subtypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(is_viral, known)`` for file-name subtypes; ``known`` is False for NORMAL images and
    pneumonias of unnamed cause, whose subtype loss weight is zero."""
    names = np.asarray(subtypes).astype(str)
    viral = (names == "virus").astype(np.float32)
    known = np.isin(names, list(SUBTYPE_TARGETS))
    return viral, known


def with_subtype_head(network: Any, dropout_layer: str = "top_dropout") -> Any:
    """``network`` with a second output, P(viral), read from the (dropped-out) pooled features.

    The layers are shared: training the returned model trains ``network``.

    Raises:
        InvalidInputError: ``network`` has no such layer (not an EfficientNet-Lite).
    """
    import keras  # lazy: loads TensorFlow

    try:
        pooled = network.get_layer(dropout_layer).output
    except ValueError:
        raise InvalidInputError(
            f"{network.name} has no {dropout_layer!r} layer to put a subtype head on; "
            "train it with --subtype-weight 0"
        ) from None
    viral = keras.layers.Dense(1, activation="sigmoid", name=SUBTYPE_HEAD)(pooled)
    return keras.Model(network.inputs, [network.outputs[0], viral], name=network.name)


@dataclass(frozen=True)
class SubtypeHead:
    """The head's weights, its calibration and the operating point of the call.

    The operating point is kept on P(bacterial) = 1 - P(viral): the call is ``bacterial``
    when the calibrated P(bacterial) reaches the threshold, which is set for a target
    sensitivity for bacterial pneumonia (a missed bacterial pneumonia is the costly error).
    """

    weights: np.ndarray
    bias: float
    point: OperatingPoint
    calibration: dict[str, Any]
    validation_metrics: dict[str, Any]

    def raw_bacterial(self, features: np.ndarray) -> np.ndarray:
        """Uncalibrated P(bacterial) = 1 - P(viral) from pooled features ``(n, d)``.

        Raises:
            ValueError: The features are not ``(n, d)`` with the head's ``d``.
        """
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != len(self.weights):
            raise ValueError(
                f"the subtype head takes {len(self.weights)} features, got {features.shape}"
            )
        return np.asarray(expit(-(features @ self.weights + self.bias)), dtype=np.float64)

    def call(self, p_viral: float) -> str:
        """``bacterial`` or ``viral`` for a calibrated P(viral): bacterial when P(bacterial)
        reaches the threshold."""
        return BACTERIAL if 1.0 - float(p_viral) >= self.point.threshold else VIRAL

    def to_metadata(self) -> dict[str, Any]:
        """The model-metadata ``subtype`` entry."""
        return {
            "classes": [BACTERIAL, VIRAL],
            "label": SUBTYPE_LABEL,
            "head": {
                "weights": [float(w) for w in self.weights],
                "bias": float(self.bias),
                "input": "pooled top_activation features (the OOD detector's network features)",
            },
            "operating_point": self.point.to_metadata(),
            "score": "threshold applies to P(bacterial) = 1 - P(viral)",
            "calibration": self.calibration,
            "validation_metrics": self.validation_metrics,
        }

    @classmethod
    def from_metadata(cls, entry: dict[str, Any], source: str = "model file") -> SubtypeHead:
        """Read :meth:`to_metadata`.

        Raises:
            ModelFileError: The entry is damaged.
        """
        try:
            weights = np.asarray(entry["head"]["weights"], dtype=np.float64)
            bias = float(entry["head"]["bias"])
            point = OperatingPoint.from_metadata(entry["operating_point"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{source}: damaged subtype metadata ({exc!r})") from exc
        if weights.ndim != 1 or not len(weights) or not np.all(np.isfinite(weights)):
            raise ModelFileError(f"{source}: the subtype head's weights are not a finite vector")
        # A NaN here would turn every estimate into NaN, or every call into one class, silently.
        numbers = (bias, point.temperature, point.logit_bias, point.threshold)
        if not all(np.isfinite(numbers)) or point.temperature <= 0 or not 0 <= point.threshold <= 1:
            raise ModelFileError(
                f"{source}: the subtype head's bias, calibration or threshold is out of range"
            )
        return cls(
            weights,
            bias,
            point,
            dict(entry.get("calibration") or {}),
            dict(entry.get("validation_metrics") or {}),
        )
