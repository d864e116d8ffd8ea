"""The JSON shapes of the API's answers (pydantic models) and a scored image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from pneumoscan.constants import VERSION as __version__
from pneumoscan.models.subtype import BACTERIAL, SUBTYPE_LABEL, VIRAL

if TYPE_CHECKING:
    from pneumoscan.inference.prediction import Prediction


class FileResult(BaseModel):
    """The outcome for one uploaded file."""

    filename: str = Field(description="The file name the client sent.")
    status: Literal["ok", "rejected", "error"] = Field(
        description="ok: scored; rejected: not a frontal chest X-ray (not scored); "
        "error: not a readable image."
    )
    probability: float | None = Field(default=None, description="P(pneumonia), when ok.")
    decision: Literal["NORMAL", "PNEUMONIA"] | None = Field(
        default=None, description="PNEUMONIA when probability >= threshold, when ok."
    )
    near_threshold: bool | None = Field(
        default=None,
        description="The score is close to the threshold (log-odds within 1 of it): read the "
        "image with care whatever the decision, when ok.",
    )
    op_score: float | None = Field(
        default=None,
        description="The score relative to the operating point: the threshold at 0.5 "
        "(piecewise linear, order kept), when ok.",
    )
    p_viral: float | None = Field(
        default=None,
        description="Calibrated probability that the pneumonia is viral rather than bacterial: "
        f"an {SUBTYPE_LABEL}. Only for a PNEUMONIA decision of a model with a subtype head "
        "(see subtype_head in /v1/model); null for NORMAL, rejected and unreadable files.",
    )
    subtype_estimate: Literal["bacterial", "viral"] | None = Field(
        default=None,
        description=f"{BACTERIAL} or {VIRAL} at the subtype head's own threshold: an "
        f"{SUBTYPE_LABEL}. Only for a PNEUMONIA decision of a model with a subtype head; "
        "null for NORMAL, rejected and unreadable files.",
    )
    threshold: float = Field(description="The model's operating threshold on P(pneumonia).")
    reason: str | None = Field(default=None, description="Why the file was rejected or not read.")
    ood_score: float | None = Field(
        default=None, description="Out-of-distribution score (above 1 is rejected), when computed."
    )
    format: str | None = Field(
        default=None, description="Format found from the content (JPEG, DICOM...)."
    )
    heatmap: str | None = Field(
        default=None,
        description="Grad-CAM overlay, base64 PNG (ok files, with ?heatmap=true, when the model "
        "has its Keras network: see heatmaps in /v1/model).",
    )
    image: str | None = Field(
        default=None,
        description="The decoded image, base64 PNG (readable files, with ?image=true).",
    )
    model_sha256: str | None = Field(
        default=None, description="SHA-256 of the model file that scored the file."
    )
    pneumoscan_version: str = Field(
        default=__version__, description="The pneumoscan version that produced the result."
    )
    scored_at: str | None = Field(
        default=None, description="When the result was made (UTC, ISO 8601)."
    )
    study_instance_uid: str | None = Field(
        default=None,
        description="The DICOM file's Study Instance UID: only for a DICOM upload and with "
        "?identifiers=true (the service never echoes identifiers it was not sent or not "
        "asked for), as the four fields below.",
    )
    series_instance_uid: str | None = Field(
        default=None, description="The DICOM file's Series Instance UID (see above)."
    )
    sop_instance_uid: str | None = Field(
        default=None, description="The DICOM file's SOP Instance UID (see above)."
    )
    accession_number: str | None = Field(
        default=None, description="The DICOM file's Accession Number (see above)."
    )
    patient_id: str | None = Field(
        default=None, description="The DICOM file's Patient ID (see above)."
    )


class PredictResponse(BaseModel):
    """Results of one upload, one per file in upload order."""

    model: str
    results: list[FileResult]


class Health(BaseModel):
    """Liveness and readiness: HTTP 200 when ready, 503 while loading or after a failure."""

    live: bool
    ready: bool
    status: Literal["loading", "ready", "failed"]
    detail: str | None = None
    version: str


class ModelInfo(BaseModel):
    """The model being served, its card and its full metadata."""

    name: str
    backend: str
    model_sha256: str | None = None
    pneumoscan_version: str = __version__
    arch: str | None
    classes: list[str]
    threshold: float
    input_size: list[int]
    heatmaps: bool
    ood_detector: bool
    subtype_head: bool = Field(
        default=False,
        description="The model carries a bacterial-or-viral head: PNEUMONIA results then have "
        f"p_viral and subtype_estimate, an {SUBTYPE_LABEL}.",
    )
    subtype_threshold: float | None = Field(
        default=None,
        description="The subtype head's operating threshold, on P(bacterial) = 1 - p_viral: "
        "bacterial at or above it, viral below (null without a subtype head).",
    )
    intended_use: str
    limits: dict[str, int]
    model_card: dict[str, Any]
    metadata: dict[str, Any]


@dataclass
class Scored:
    """One image's prediction result and, when asked and ok, its Grad-CAM map."""

    result: Prediction
    heatmap: np.ndarray | None = None
