"""One prediction as a typed record: what every output (CSV, JSON, Parquet, the API's table,
the service's answer) is made from.

A :class:`Prediction` says what happened to one input (``ok``, ``rejected``, ``error``), the
score and decision when there is one, and which model made it (threshold, the model file's
SHA-256, the pneumoscan version, the time). Its fields are the columns of every results file,
in order (:func:`result_columns`), so a new optional field (a DICOM study UID, say) becomes a
new column of every writer without touching any of them.

The score is also given relative to the operating point (:func:`op_score`, as
TorchXRayVision's ``op_norm``: the threshold sits at 0.5) and flagged when it is close to the
threshold (:func:`near_threshold`): at a new site the raw P(pneumonia) is not a frequency
(MODEL_CARD.md), so a 0.91 beside a 0.92 threshold must not read as a confident "normal".
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from scipy.special import logit

from pneumoscan.constants import CLASSES
from pneumoscan.constants import VERSION as __version__

Status = Literal["ok", "rejected", "error"]
#: A score whose log-odds lie within this of the threshold's is "close to the threshold":
#: the odds differ from the threshold's by less than a factor of e (2.7). At the shipped
#: int8 model's threshold (0.92) that is P(pneumonia) 0.81 to 0.97.
NEAR_THRESHOLD_LOGIT = 1.0
#: What a person is told about a score close to the threshold.
NEAR_THRESHOLD_TEXT = "close to the threshold: read with care"
_P_EPS = 1e-12


def decide(probability: float, threshold: float) -> str:
    """Class name for a probability at the model's operating threshold."""
    return CLASSES[1] if probability >= threshold else CLASSES[0]


def op_score(probability: float, threshold: float) -> float:
    """P(pneumonia) rescaled piecewise linearly so the threshold sits at 0.5 (order kept).

    TorchXRayVision's ``op_norm``: below the threshold ``p / (2 t)``, above it
    ``1 - (1 - p) / (2 (1 - t))``. A score of 0.49 reads "just below the operating point"
    whatever the threshold is.
    """
    t = min(max(float(threshold), _P_EPS), 1.0 - _P_EPS)
    p = float(probability)
    if p < t:
        return p / (2.0 * t)
    return 1.0 - (1.0 - p) / (2.0 * (1.0 - t))


def near_threshold(probability: float, threshold: float) -> bool:
    """Whether a score's log-odds lie within :data:`NEAR_THRESHOLD_LOGIT` of the threshold's."""
    p = min(max(float(probability), _P_EPS), 1.0 - _P_EPS)
    t = min(max(float(threshold), _P_EPS), 1.0 - _P_EPS)
    return bool(abs(float(logit(p)) - float(logit(t))) <= NEAR_THRESHOLD_LOGIT)


def reading(probability: float, threshold: float) -> str:
    """The score in words for a person: close to the threshold (read with care), or above
    or below it."""
    side = "above" if probability >= threshold else "below"
    if near_threshold(probability, threshold):
        return f"{NEAR_THRESHOLD_TEXT} (just {side} it)"
    if probability >= threshold:
        return "above the threshold: pneumonia suspected"
    return "below the threshold: no pneumonia suspected"


def printable_path(path: str | bytes | os.PathLike[Any]) -> str:
    """A path as text every output can hold: a file name that is not UTF-8 (its bytes kept by
    the OS, surrogates in Python) gets its odd bytes written as ``\\xNN``."""
    name = os.fsdecode(path) if isinstance(path, bytes | os.PathLike) else path
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class ModelIdentity:
    """Which model made a prediction: enough to trace any result back to its file.

    Attributes:
        name: The model file's name.
        path: The file that scores (the ``.onnx`` export, or the ``.keras`` file).
        backend: ``onnx`` or ``keras``.
        threshold: The operating threshold on P(pneumonia).
        model_sha256: SHA-256 of the scoring file (of its source ``.keras`` file for a
            temporary export).
        pneumoscan_version: The version that produced the result.
    """

    name: str
    path: str
    backend: str
    threshold: float
    model_sha256: str | None
    pneumoscan_version: str = __version__


@dataclass(frozen=True)
class Prediction:
    """The outcome for one input, in the order every results file has its columns.

    New fields must have a default (``None``): old results files then still read, and every
    writer gains the column by itself. The DICOM identifiers (study, series and SOP instance
    UIDs, accession number, patient id) were added that way; they are filled from the header
    of a DICOM input on the one decode path and left empty for every other format.

    Attributes:
        path: The input: a file path, an upload's file name, or ``image N`` for an in-memory
            image.
        status: ``ok`` (scored), ``rejected`` (not a frontal chest X-ray) or ``error``
            (unreadable).
        probability: P(pneumonia), full precision (when ok).
        decision: ``NORMAL`` or ``PNEUMONIA`` at the threshold (when ok).
        near_threshold: The score is close to the threshold: read with care (when ok).
        op_score: The score relative to the operating point, threshold at 0.5 (when ok).
        p_viral: For a PNEUMONIA decision of a model with a subtype head: the calibrated
            probability that the pneumonia is viral rather than bacterial, an estimate from
            the X-ray, not a microbiological diagnosis (empty for NORMAL).
        subtype_estimate: ``bacterial`` or ``viral`` at the subtype head's own threshold
            (empty for NORMAL); see :data:`pneumoscan.models.subtype.SUBTYPE_LABEL`.
        threshold: The operating threshold the decision used.
        ood_score: Out-of-distribution score (above 1 is rejected), when computed.
        reason: Why the input was rejected or could not be read.
        error: Why the input could not be read (``error`` only).
        warning: With the checks off: why the checks would have rejected the image.
        heatmap: The Grad-CAM overlay written for it, if any.
        model_sha256: SHA-256 of the model file that scored it.
        pneumoscan_version: The pneumoscan version that produced it.
        scored_at: When it was made (UTC, ISO 8601).
        study_instance_uid: The DICOM input's Study Instance UID (DICOM inputs only, as
            the other identifiers; none with ``anonymise``).
        series_instance_uid: Its Series Instance UID.
        sop_instance_uid: Its SOP Instance UID.
        accession_number: Its Accession Number.
        patient_id: Its Patient ID.
    """

    path: str
    status: Status
    probability: float | None = None
    decision: str | None = None
    near_threshold: bool | None = None
    op_score: float | None = None
    p_viral: float | None = None
    subtype_estimate: str | None = None
    threshold: float | None = None
    ood_score: float | None = None
    reason: str | None = None
    error: str | None = None
    warning: str | None = None
    heatmap: str | None = None
    model_sha256: str | None = None
    pneumoscan_version: str = __version__
    scored_at: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None

    @classmethod
    def scored(
        cls, probability: float, threshold: float, ood_score: float | None = None
    ) -> Prediction:
        """An ``ok`` prediction (``path`` is filled in by :meth:`replace`)."""
        return cls(
            path="",
            status="ok",
            probability=float(probability),
            decision=decide(probability, threshold),
            near_threshold=near_threshold(probability, threshold),
            op_score=op_score(probability, threshold),
            threshold=float(threshold),
            ood_score=ood_score,
        )

    def with_subtype(self, p_viral: float, call: str) -> Prediction:
        """This prediction with the subtype estimate, if it was decided PNEUMONIA (a NORMAL
        decision carries none)."""
        if self.decision != CLASSES[1]:
            return self
        return self.replace(p_viral=float(p_viral), subtype_estimate=call)

    @classmethod
    def failed(cls, path: str, message: str) -> Prediction:
        """The prediction of an input that gave no probability (missing, unreadable)."""
        return cls(path=path, status="error", error=message, reason=message)

    def replace(self, **changes: Any) -> Prediction:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def traced(self, identity: ModelIdentity | None, scored_at: str) -> Prediction:
        """This prediction with the model's identity and the time recorded."""
        if identity is None:
            return self.replace(scored_at=scored_at)
        return self.replace(
            threshold=identity.threshold if self.threshold is None else self.threshold,
            model_sha256=identity.model_sha256,
            pneumoscan_version=identity.pneumoscan_version,
            scored_at=scored_at,
        )

    def anonymised(self) -> Prediction:
        """This prediction without its DICOM identifiers (:data:`IDENTIFIER_FIELDS`)."""
        return self.replace(**dict.fromkeys(IDENTIFIER_FIELDS))

    def as_row(self) -> dict[str, Any]:
        """The fields as a plain dict in column order, the path made printable
        (:func:`printable_path`)."""
        row = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        row["path"] = printable_path(self.path)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Prediction:
        """A prediction from a results file's row (CSV cells are text; empty means none).

        Columns this version does not know are ignored.
        """
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = row.get(field.name)
            if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
                continue
            values[field.name] = _typed(field.name, value)
        values.setdefault("path", "")
        values.setdefault("status", "error")
        return cls(**values)


#: The fields that identify a DICOM input's study, series, instance and patient; what
#: ``anonymise`` drops.
IDENTIFIER_FIELDS = (
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "accession_number",
    "patient_id",
)

#: The fields that hold numbers (every results file's float columns).
FLOAT_FIELDS = frozenset({"probability", "op_score", "p_viral", "threshold", "ood_score"})


def _typed(name: str, value: Any) -> Any:
    if name in FLOAT_FIELDS:
        return float(value)
    if name == "near_threshold":
        return value if isinstance(value, bool) else str(value).lower() == "true"
    return str(value)


def result_columns() -> tuple[str, ...]:
    """The columns of every results file: :class:`Prediction`'s fields, in order."""
    return tuple(field.name for field in dataclasses.fields(Prediction))


#: The columns of every results file (:func:`result_columns`).
RESULT_FIELDS = result_columns()


def summarise(predictions: Any) -> dict[str, int]:
    """Count of predictions per status."""
    counts = {"ok": 0, "rejected": 0, "error": 0}
    for prediction in predictions:
        counts[prediction.status] = counts.get(prediction.status, 0) + 1
    return counts
