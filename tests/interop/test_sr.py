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
from pneumoscan.models.subtype import SUBTYPE_LABEL

MODEL = ReportedModel(
    name="model.int8.onnx",
    sha256="0123456789abcdef" * 4,
    threshold=0.92,
    threshold_rule="highest threshold with validation sensitivity >= 0.95",
    subtype_threshold=0.35,
    subtype_rule="highest threshold with validation bacterial sensitivity >= 0.9",
)
SCORED = ImageResult(status="ok", probability=0.953, decision="PNEUMONIA", threshold=0.92)
SUBTYPED = ImageResult(
    status="ok",
    probability=0.953,
    decision="PNEUMONIA",
    threshold=0.92,
    p_viral=0.71,
    subtype_estimate="viral",
)
# Subtype values on a NORMAL result (a damaged row, say) must still not reach a report.
NORMAL = ImageResult(
    status="ok",
    probability=0.4,
    decision="NORMAL",
    threshold=0.92,
    p_viral=0.71,
    subtype_estimate="viral",
)
HAND = ImageResult.refused("not a frontal chest radiograph: BodyPartExamined is HAND")
BROKEN = ImageResult.refused("instance 1.2.3: damaged DICOM Pixel Data", "error")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> pydicom.Dataset:
    made = make_studies(tmp_path_factory.mktemp("studies"))
    return pydicom.dcmread(made[0].path)


@pytest.mark.parametrize(
    "result", [SCORED, SUBTYPED, HAND, BROKEN], ids=["scored", "subtyped", "refused", "error"]
)
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


def _items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item of the tree, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        found.append(item)
        found.extend(_items(item))
    return found


def _named(ds: pydicom.Dataset, code: str) -> list[pydicom.Dataset]:
    return [i for i in _items(ds) if i.ConceptNameCodeSequence[0].CodeValue == code]


def _subtype_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    texts = [i for i in _items(ds) if SUBTYPE_LABEL in str(i.get("TextValue", ""))]
    return _named(ds, "P-VIRAL") + _named(ds, "SUBTYPE") + texts


def test_a_pneumonia_with_a_subtype_gets_the_estimate_beside_the_finding(
    source: pydicom.Dataset,
) -> None:
    sr = build_sr(SUBTYPED, source, MODEL)
    (group,) = _named(sr, "126010")  # Imaging Measurements > Measurement Group
    (finding_group,) = [i for i in group.ContentSequence if i.ValueType == "CONTAINER"]
    children = finding_group.ContentSequence
    (p_viral,) = [i for i in children if i.ConceptNameCodeSequence[0].CodeValue == "P-VIRAL"]
    assert p_viral.ValueType == "NUM" and p_viral.RelationshipType == "CONTAINS"
    assert float(p_viral.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.71)
    assert p_viral.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "1"
    (call,) = [i for i in children if i.ConceptNameCodeSequence[0].CodeValue == "SUBTYPE"]
    assert call.ValueType == "CODE"
    value = call.ConceptCodeSequence[0]
    assert (value.CodeValue, value.CodingSchemeDesignator) == ("75570004", "SCT")
    assert value.CodeMeaning == "Viral pneumonia"
    (note,) = [i for i in children if i.ValueType == "TEXT" and SUBTYPE_LABEL in i.TextValue]
    assert note.ConceptNameCodeSequence[0].CodeValue == "121106"  # DCM Comment
    # The finding itself is unchanged: Pneumonia present, P(pneumonia) beside it.
    assert _named(sr, "233604007")[0].ConceptCodeSequence[0].CodeValue == "52101004"
    texts = _texts(sr)
    assert any("subtype threshold 0.350000 on P(bacterial)" in t for t in texts)
    assert f"subtype threshold rule: {MODEL.subtype_rule}" in texts


def test_a_bacterial_call_is_coded_as_bacterial_pneumonia(source: pydicom.Dataset) -> None:
    bacterial = ImageResult(
        **{**SUBTYPED.__dict__, "p_viral": 0.1, "subtype_estimate": "bacterial"}
    )
    sr = build_sr(bacterial, source, MODEL)
    assert _named(sr, "SUBTYPE")[0].ConceptCodeSequence[0].CodeValue == "53084003"
    assert read_sr(sr) == bacterial


@pytest.mark.parametrize(
    "result", [SCORED, NORMAL, HAND, BROKEN], ids=["no-subtype", "normal", "refused", "error"]
)
def test_no_subtype_items_without_a_subtyped_pneumonia(
    source: pydicom.Dataset, result: ImageResult
) -> None:
    sr = build_sr(result, source, MODEL)
    assert _subtype_items(sr) == []
    assert not [t for t in _texts(sr) if "subtype" in t]
    assert read_sr(sr).p_viral is None and read_sr(sr).subtype_estimate is None


def test_rows_carry_the_subtype_of_pneumonia_decisions_only() -> None:
    row = {"status": "ok", "probability": 0.95, "decision": "PNEUMONIA", "threshold": 0.92}
    subtyped = ImageResult.from_row(row | {"p_viral": "0.71", "subtype_estimate": "viral"})
    assert (subtyped.p_viral, subtyped.subtype_estimate) == (0.71, "viral")
    assert subtyped.has_subtype
    normal = ImageResult.from_row(
        row
        | {"probability": 0.4, "decision": "NORMAL", "p_viral": 0.71, "subtype_estimate": "viral"}
    )
    assert normal.p_viral is None and normal.subtype_estimate is None
    # Empty cells of a table (NaN) are no subtype.
    empty = ImageResult.from_row(row | {"p_viral": float("nan"), "subtype_estimate": float("nan")})
    assert empty.p_viral is None and empty.subtype_estimate is None and not empty.has_subtype


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
@pytest.mark.parametrize("result", [SCORED, SUBTYPED, BROKEN], ids=["scored", "subtyped", "error"])
def test_field_tools_accept_it(
    source: pydicom.Dataset, result: ImageResult, tmp_path: Path
) -> None:
    assert DSRDUMP is not None and DCIODVFY is not None
    path = tmp_path / "sr.dcm"
    build_sr(result, source, MODEL).save_as(path, enforce_file_format=True)
    dump = subprocess.run([DSRDUMP, "+Pl", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "Pneumonia" in dump.stdout
    if result.has_subtype:
        assert "Viral pneumonia" in dump.stdout and SUBTYPE_LABEL in dump.stdout
    check = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
    assert not [line for line in check.stderr.splitlines() if line.startswith("Error")]
