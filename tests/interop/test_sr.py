"""The SR builder: a pure function of the result, the source header and the model."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pacs_server import DCIODVFY, DSRDUMP, needs_dicom_tools
from studies import make_studies

from pneumoscan.interop.records import ImageResult, ReportedModel
from pneumoscan.interop.sr import build_sr, read_sr, sr_uids

MODEL = ReportedModel(
    name="model.int8.onnx",
    sha256="0123456789abcdef" * 4,
    threshold=0.92,
    threshold_rule="highest threshold with validation sensitivity >= 0.95",
)
SCORED = ImageResult(status="ok", probability=0.953, decision="PNEUMONIA", threshold=0.92)
HAND = ImageResult.refused("not a frontal chest radiograph: BodyPartExamined is HAND")
BROKEN = ImageResult.refused("instance 1.2.3: damaged DICOM Pixel Data", "error")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> pydicom.Dataset:
    made = make_studies(tmp_path_factory.mktemp("studies"))
    return pydicom.dcmread(made[0].path)


@pytest.mark.parametrize("result", [SCORED, HAND, BROKEN], ids=["scored", "refused", "error"])
def test_result_reads_back(source: pydicom.Dataset, result: ImageResult) -> None:
    sr = build_sr(result, source, MODEL)
    assert read_sr(sr) == result


def test_sr_copies_patient_and_study_and_records_the_model(source: pydicom.Dataset) -> None:
    sr = build_sr(SCORED, source, MODEL)
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.Modality == "SR" and sr.VerificationFlag == "UNVERIFIED"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
    texts = _texts(sr)
    assert f"model SHA-256 {MODEL.sha256}" in texts
    assert f"threshold rule: {MODEL.threshold_rule}" in texts
    assert "pneumoscan model.int8.onnx" in texts
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99PNEUMOSCAN"


def _texts(ds: pydicom.Dataset) -> list[str]:
    found = [str(ds.TextValue)] if "TextValue" in ds else []
    for item in ds.get("ContentSequence", []):
        found.extend(_texts(item))
    return found


def test_uids_are_fixed_by_what_the_sr_describes(source: pydicom.Dataset) -> None:
    first, again = build_sr(SCORED, source, MODEL), build_sr(HAND, source, MODEL)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == sr_uids(source, MODEL)
    assert first.SOPInstanceUID == again.SOPInstanceUID
    other = ReportedModel(name="other.onnx", sha256="f" * 64, threshold=0.5)
    assert build_sr(SCORED, source, other).SOPInstanceUID != first.SOPInstanceUID


def test_a_header_without_patient_attributes_still_makes_an_sr(source: pydicom.Dataset) -> None:
    bare = pydicom.Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(bare, keyword, source.get(keyword))
    sr = build_sr(HAND, bare, MODEL)
    assert not sr.PatientID and read_sr(sr) == HAND


@needs_dicom_tools
@pytest.mark.parametrize("result", [SCORED, BROKEN], ids=["scored", "error"])
def test_field_tools_accept_it(
    source: pydicom.Dataset, result: ImageResult, tmp_path: Path
) -> None:
    assert DSRDUMP is not None and DCIODVFY is not None
    path = tmp_path / "sr.dcm"
    build_sr(result, source, MODEL).save_as(path, enforce_file_format=True)
    dump = subprocess.run([DSRDUMP, "+Pl", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "Pneumonia" in dump.stdout
    check = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    assert not [line for line in check.stderr.splitlines() if line.startswith("Error")]
