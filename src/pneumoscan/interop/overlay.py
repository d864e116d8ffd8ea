"""A Grad-CAM overlay as a DICOM Secondary Capture image, labelled as not for diagnosis in its
pixels (a red banner) and in its tags (Burned In Annotation, Image Comments, the series
description), with highdicom.

A pure function of the overlay's RGB pixels, the source image's header and the model's identity
(:func:`build_overlay_sc`); its UIDs derive from the source instance and the model's hash, as the
SR's do, so storing it twice changes nothing.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoscan.interop.records import UID_PREFIX, ReportedModel
from pneumoscan.interop.sr import MANUFACTURER, evidence_header

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS"
SERIES_NUMBER = 9901
SERIES_DESCRIPTION = f"pneumoscan Grad-CAM overlay ({NOT_FOR_DIAGNOSIS})"
#: Height of the burned-in banner, as a fraction of the image height (at least 24 pixels).
_BANNER = 0.06


def overlay_uids(source: Dataset, model: ReportedModel) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of the overlay of ``source`` by ``model``."""
    study, instance = str(source.StudyInstanceUID), str(source.SOPInstanceUID)
    series = generate_uid(UID_PREFIX, entropy_srcs=["pneumoscan-overlays", study, model.sha256])
    sop = generate_uid(UID_PREFIX, entropy_srcs=["pneumoscan-overlay", instance, model.sha256])
    return str(series), str(sop)


def with_banner(rgb: np.ndarray, text: str = NOT_FOR_DIAGNOSIS) -> np.ndarray:
    """The image with a red banner on top saying ``text`` (burned into the pixels)."""
    image = Image.fromarray(np.asarray(rgb, np.uint8)).convert("RGB")
    height = max(24, round(image.height * _BANNER))
    canvas = Image.new("RGB", (image.width, image.height + height), (170, 0, 0))
    canvas.paste(image, (0, height))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(12, height * 2 // 3))
    draw.text((8, height // 2), text, fill=(255, 255, 255), font=font, anchor="lm")
    return np.asarray(canvas)


def build_overlay_sc(
    rgb: np.ndarray,
    source: Dataset,
    model: ReportedModel,
    *,
    instance_number: int = 1,
) -> hd.sc.SCImage:
    """The Secondary Capture image of one Grad-CAM overlay.

    Args:
        rgb: ``(H, W, 3)`` uint8 overlay (the X-ray in grey, the heatmap in colour).
        source: The scored image's header: its patient and study are copied, and the overlay
            names it as its source.
        model: The model whose evidence the colours show.
        instance_number: Instance Number within the study's overlay series.
    """
    series_uid, sop_uid = overlay_uids(source, model)
    pixels = with_banner(rgb)
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence_header(source),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=SERIES_DESCRIPTION,
    )
    image.BurnedInAnnotation = "YES"
    # Type 2C in the General Series module: a chest is not a paired body part, so empty.
    image.Laterality = ""
    image.ImageComments = (
        f"{NOT_FOR_DIAGNOSIS}: Grad-CAM evidence map of pneumoscan {model.name} "
        f"(version {model.version}) over instance {source.SOPInstanceUID}"
    )
    image.DerivationDescription = "Grad-CAM heatmap over the source image"
    image.SourceImageSequence = [_reference(source)]
    return image


def _reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item
