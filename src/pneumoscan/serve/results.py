"""Per-file work: decoding an upload, pictures for the page, one file's result."""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pneumoscan.constants import HEATMAP_MAX_SIDE
from pneumoscan.data.preprocess import DecodeFailure, decode_image
from pneumoscan.errors import ImageReadError
from pneumoscan.inference.explain import heatmap_title, overlay_png
from pneumoscan.inference.predict import decode_failed, display_at_original_aspect
from pneumoscan.inference.prediction import ModelIdentity, Prediction
from pneumoscan.models.modelfile import now_utc
from pneumoscan.serve.config import _RENDER_LOCK, PREVIEW_MAX_SIDE
from pneumoscan.serve.schemas import FileResult, Scored

if TYPE_CHECKING:
    from pneumoscan.data.preprocess import DecodedImage
    from pneumoscan.inference.scorer import AnyModel


logger = logging.getLogger("pneumoscan.serve")


def decode_upload(data: bytes, filename: str, model: AnyModel) -> DecodedImage | DecodeFailure:
    """Decode one upload for the model, or why it cannot be; never raises.

    The decoder names the file as the client sent it, so messages need no patching.
    """
    try:
        return decode_image(data, model.preprocess, name=filename)
    except ImageReadError as exc:
        return DecodeFailure.from_exception(filename, exc)
    except Exception as exc:  # every failure becomes a per-file reason, never a 500
        # decode_image turns every failure into an ImageReadError; should anything else get
        # here, name its kind only (its text might quote file content).
        kind = type(exc).__name__
        message = f"{filename}: the decoder failed on this file ({kind})"
        return DecodeFailure(filename, message, kind)


def png_base64(pixels: np.ndarray) -> str:
    """Base64 PNG of a uint8 image (stored as grey when the channels are equal)."""
    image = Image.fromarray(pixels)
    grey = pixels.ndim == 3 and all(np.array_equal(pixels[..., 0], pixels[..., c]) for c in (1, 2))
    if grey:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_base64(
    decoded: DecodedImage, heatmap: np.ndarray, filename: str, result: Prediction
) -> str:
    """Base64 PNG of the Grad-CAM overlay, drawn like ``pneumoscan predict --heatmaps``."""
    title = heatmap_title(filename, result)
    picture = display_at_original_aspect(decoded, HEATMAP_MAX_SIDE)
    with _RENDER_LOCK:
        data = overlay_png(picture, heatmap, title, max_side=HEATMAP_MAX_SIDE)
    return base64.b64encode(data).decode("ascii")


def _picture(draw: Callable[[], str], what: str) -> str | None:
    """A picture for the result, or ``None`` if drawing it failed (the result still stands)."""
    try:
        return draw()
    except Exception as exc:  # a drawing failure must not turn the whole request into a 500
        logger.error("drawing the %s failed (%s)", what, type(exc).__name__)
        return None


def build_result(
    filename: str,
    decoded: DecodedImage | DecodeFailure,
    scored: Scored | None,
    identity: ModelIdentity,
    with_image: bool,
    identifiers: bool = False,
) -> FileResult:
    """The API's result for one file from its decoding and scoring, with the identity of the
    model that made it (threshold, the model file's hash, the pneumoscan version, the time).

    The DICOM identifiers (study, series and SOP instance UIDs, accession number, patient
    id) are in it only when ``identifiers`` is asked for and the upload was a DICOM file
    whose header held them: the service never echoes an identifier it was not sent, and by
    default sends none back.
    """
    if isinstance(decoded, DecodeFailure) or scored is None:
        if isinstance(decoded, DecodeFailure):
            prediction = decode_failed(filename, decoded)
            if not (identifiers and decoded.dicom is not None):
                prediction = prediction.anonymised()
        else:
            prediction = Prediction.failed(filename, f"{filename}: not scored")
        return _file_result(prediction.traced(identity, now_utc()), None, None)
    result = scored.result.replace(path=filename)
    if not (identifiers and decoded.source_format == "DICOM"):
        result = result.anonymised()
    cam = scored.heatmap
    heatmap = None
    if cam is not None:
        heatmap = _picture(lambda: heatmap_base64(decoded, cam, filename, result), "heatmap")
    image = None
    if with_image:
        image = _picture(
            lambda: png_base64(display_at_original_aspect(decoded, PREVIEW_MAX_SIDE)), "image"
        )
    return _file_result(result, heatmap, image, decoded.source_format)


def _file_result(
    prediction: Prediction,
    heatmap: str | None,
    image: str | None,
    source_format: str | None = None,
) -> FileResult:
    """The service's shape of a :class:`Prediction` (the upload's name as ``filename``)."""
    return FileResult(
        filename=prediction.path,
        status=prediction.status,
        probability=prediction.probability,
        decision=prediction.decision,  # type: ignore[arg-type]  # NORMAL or PNEUMONIA
        near_threshold=prediction.near_threshold,
        op_score=prediction.op_score,
        p_viral=prediction.p_viral,
        subtype_estimate=prediction.subtype_estimate,  # type: ignore[arg-type]  # the head's classes
        threshold=float(prediction.threshold or 0.0),
        reason=prediction.reason,
        ood_score=prediction.ood_score,
        format=source_format,
        heatmap=heatmap,
        image=image,
        model_sha256=prediction.model_sha256,
        pneumoscan_version=prediction.pneumoscan_version,
        scored_at=prediction.scored_at,
        study_instance_uid=prediction.study_instance_uid,
        series_instance_uid=prediction.series_instance_uid,
        sop_instance_uid=prediction.sop_instance_uid,
        accession_number=prediction.accession_number,
        patient_id=prediction.patient_id,
    )
