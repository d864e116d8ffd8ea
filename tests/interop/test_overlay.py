"""The Grad-CAM overlay as a Secondary Capture: labelled not for diagnosis, in pixels and tags."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pacs_server import DCIODVFY, needs_dicom_tools
from studies import make_studies
from test_sr import MODEL

from pneumoscan.interop.overlay import NOT_FOR_DIAGNOSIS, build_overlay_sc, overlay_uids


def _overlay(tmp_path: Path) -> tuple[pydicom.Dataset, pydicom.Dataset]:
    source = pydicom.dcmread(make_studies(tmp_path / "studies")[0].path)
    picture = np.full((120, 100, 3), 90, np.uint8)
    return source, build_overlay_sc(picture, source, MODEL)


def test_overlay_is_labelled_and_references_its_source(tmp_path: Path) -> None:
    source, overlay = _overlay(tmp_path)
    assert overlay.BurnedInAnnotation == "YES"
    assert overlay.ImageComments.startswith(NOT_FOR_DIAGNOSIS)
    assert NOT_FOR_DIAGNOSIS in overlay.SeriesDescription
    assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (overlay.StudyInstanceUID, overlay.PatientID) == (
        source.StudyInstanceUID,
        source.PatientID,
    )
    assert (overlay.SeriesInstanceUID, overlay.SOPInstanceUID) == overlay_uids(source, MODEL)
    pixels = overlay.pixel_array
    assert pixels.shape[0] > 120 and pixels.shape[1] == 100
    assert tuple(pixels[2, 2]) == (170, 0, 0)  # the red banner on top
    assert (pixels[-1] == 90).all()  # the picture below it, unchanged


@needs_dicom_tools
def test_dciodvfy_finds_no_error(tmp_path: Path) -> None:
    assert DCIODVFY is not None
    _, overlay = _overlay(tmp_path)
    path = tmp_path / "overlay.dcm"
    overlay.save_as(path, enforce_file_format=True)
    check = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    assert not [line for line in check.stderr.splitlines() if line.startswith("Error")]
