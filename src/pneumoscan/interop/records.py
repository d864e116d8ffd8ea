"""What the SR and FHIR builders are pure functions of: one image's result and the model's
identity, as plain typed values (no network, no file)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pneumoscan.constants import CLASSES, VERSION
from pneumoscan.inference.prediction import Prediction
from pneumoscan.inference.predictor import Predictor
from pneumoscan.inference.scorer import subtype_head
from pneumoscan.models.subtype import BACTERIAL, VIRAL

#: Organisation root under which pneumoscan derives its DICOM UIDs (pydicom's own root:
#: UIDs made from a hash of what they name, so the same result always gets the same UID).
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class ReportedModel:
    """The model behind a result, as an SR or a FHIR report names it: the scoring path's
    model identity plus the threshold's rule and the architecture.

    Attributes:
        name: The model file's name (``efficientnet_lite0-res224-kermany.int8.onnx``).
        sha256: SHA-256 of that file (of its source ``.keras`` file for a temporary export).
        threshold: Operating threshold on P(pneumonia).
        threshold_rule: How the threshold was chosen, or ``None`` when not recorded.
        version: The pneumoscan version that scored.
        arch: The architecture's registry name, when known.
        subtype_threshold: The bacterial-or-viral head's threshold, on P(bacterial) =
            1 - P(viral) (``None``: the model has no such head).
        subtype_rule: How that threshold was chosen, or ``None`` when not recorded.
    """

    name: str
    sha256: str
    threshold: float
    threshold_rule: str | None = None
    version: str = VERSION
    arch: str | None = None
    subtype_threshold: float | None = None
    subtype_rule: str | None = None

    @classmethod
    def of(cls, predictor: Predictor) -> ReportedModel:
        """The identity of an opened model (:attr:`Predictor.identity`), with its threshold's
        rule, architecture and subtype head's operating point."""
        identity = predictor.identity
        head = subtype_head(predictor.model)
        return cls(
            name=identity.name,
            sha256=identity.model_sha256 or "unknown",
            threshold=identity.threshold,
            threshold_rule=predictor.model.operating_point.threshold_rule,
            version=identity.pneumoscan_version,
            arch=predictor.model.arch,
            subtype_threshold=None if head is None else head.point.threshold,
            subtype_rule=None if head is None else head.point.threshold_rule,
        )

    def subtype_parameters(self) -> list[str]:
        """The subtype call's rule in words (empty without a subtype head): what a report
        that shows the estimate must also say about how it was made."""
        if self.subtype_threshold is None:
            return []
        parameters = [
            f"subtype threshold {self.subtype_threshold:.6f} on P(bacterial) = 1 - P(viral): "
            f"{BACTERIAL} when reached, else {VIRAL}"
        ]
        if self.subtype_rule:
            parameters.append(f"subtype threshold rule: {self.subtype_rule}")
        return parameters


@dataclass(frozen=True)
class ImageResult:
    """One image's result, whatever produced it.

    Attributes:
        status: ``ok`` (scored), ``rejected`` (not a frontal chest X-ray) or ``error``
            (unreadable).
        probability: Calibrated P(pneumonia), for ``ok`` only.
        decision: ``PNEUMONIA`` or ``NORMAL``, for ``ok`` only.
        threshold: The threshold the decision was made at.
        reason: Why there is no probability (``rejected`` and ``error``).
        scored_at: When it was scored (UTC, ISO 8601), if known.
        p_viral: Calibrated P(viral) of the bacterial-or-viral head, for a ``PNEUMONIA``
            decision of a model with such a head only.
        subtype_estimate: ``bacterial`` or ``viral`` at the head's threshold, likewise; an
            estimate, not a microbiological diagnosis.
    """

    status: str
    probability: float | None = None
    decision: str | None = None
    threshold: float | None = None
    reason: str | None = None
    scored_at: str | None = None
    p_viral: float | None = None
    subtype_estimate: str | None = None

    @property
    def scored(self) -> bool:
        """Whether the image has a probability."""
        return self.status == "ok" and self.probability is not None

    @property
    def has_subtype(self) -> bool:
        """Whether a report shows a subtype estimate: a scored PNEUMONIA decision that has
        both P(viral) and the call."""
        return (
            self.scored
            and self.decision == CLASSES[1]
            and self.p_viral is not None
            and self.subtype_estimate in (BACTERIAL, VIRAL)
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ImageResult:
        """The result in a row of ``pneumoscan predict`` (CSV, JSON lines or the API)."""
        status = str(row.get("status") or "error")
        probability = row.get("probability")
        threshold = row.get("threshold")
        reason = row.get("reason") or row.get("error")
        p_viral = row.get("p_viral")
        decision = row.get("decision") or None
        # A row of a NORMAL (or unscored) image never carries a subtype, whatever its cells say.
        subtyped = status == "ok" and decision == CLASSES[1]
        return cls(
            status=status,
            probability=None if probability in (None, "") else float(probability),
            decision=decision,
            threshold=None if threshold in (None, "") else float(threshold),
            reason=None if status == "ok" else str(reason or "not scored"),
            scored_at=row.get("scored_at") or None,
            p_viral=_number(p_viral) if subtyped else None,
            subtype_estimate=_subtype(row.get("subtype_estimate")) if subtyped else None,
        )

    @classmethod
    def from_prediction(cls, prediction: Prediction | Mapping[str, Any]) -> ImageResult:
        """The result in a :class:`~pneumoscan.inference.prediction.Prediction`, or in a
        results row (a mapping)."""
        return cls.from_row(
            prediction.as_row() if isinstance(prediction, Prediction) else prediction
        )

    @classmethod
    def refused(cls, reason: str, status: str = "rejected") -> ImageResult:
        """A result without a probability, and why."""
        return cls(status=status, reason=reason)


def _number(value: Any) -> float | None:
    """A cell as a number; empty, missing and NaN (a table's empty cell) are none."""
    if value in (None, ""):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _subtype(value: Any) -> str | None:
    """A cell as a subtype call; anything but ``bacterial`` or ``viral`` (a table's NaN) is
    none."""
    return str(value) if value in (BACTERIAL, VIRAL) else None
