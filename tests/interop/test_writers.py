"""SR and FHIR writers fed with the Predictor's predictions (and predict's rows) for DICOM
files: two more results writers."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from studies import Instance, make_studies, xray

from pneumoscan.inference.prediction import Prediction
from pneumoscan.inference.predictor import Predictor
from pneumoscan.inference.writers import ResultWriter
from pneumoscan.interop.records import ReportedModel
from pneumoscan.interop.sr import read_sr
from pneumoscan.interop.writers import FhirWriter, SrWriter


@pytest.fixture(scope="module")
def scored(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[Instance], list[Prediction], ReportedModel]:
    made = make_studies(tmp_path_factory.mktemp("studies"))
    predictor = Predictor.open()
    inputs = [str(i.path) for i in made] + [str(xray("NORMAL", 0))]  # a JPEG: no study
    predictions = list(predictor.predict_files(inputs))
    return made, predictions, ReportedModel.of(predictor)


def test_sr_writer_writes_one_sr_per_dicom_input(
    scored: tuple[list[Instance], list[Prediction], ReportedModel], tmp_path: Path
) -> None:
    made, rows, model = scored
    writer: ResultWriter = SrWriter(tmp_path / "sr", model)
    for row in rows:
        writer.write(row)
    writer.close()
    assert isinstance(writer, SrWriter)
    assert len(writer.written) == len(made) and writer.skipped == [rows[-1].path]
    for instance, row, path in zip(made, rows, writer.written, strict=False):
        result = read_sr(pydicom.dcmread(path))
        # predict applies the series rules of pacs: the hand image is rejected with a reason.
        assert result.status == row.status
        if row.status == "ok":
            assert result.probability == row.probability
        else:
            assert result.probability is None and result.reason
        assert pydicom.dcmread(path).StudyInstanceUID == instance.study_uid


def test_fhir_writer_writes_one_bundle_per_study(
    scored: tuple[list[Instance], list[Prediction], ReportedModel], tmp_path: Path
) -> None:
    made, rows, model = scored
    writer: ResultWriter = FhirWriter(tmp_path / "fhir.ndjson", model)
    for row in rows:
        writer.write(row)
    writer.close()
    assert isinstance(writer, FhirWriter) and writer.skipped == [rows[-1].path]
    lines = writer.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len({i.study_uid for i in made})
    for line in lines:
        Bundle.model_validate(json.loads(line))


def test_writers_take_predict_rows_too(
    scored: tuple[list[Instance], list[Prediction], ReportedModel], tmp_path: Path
) -> None:
    _, rows, model = scored
    writer = SrWriter(tmp_path / "sr", model)
    writer.write(rows[0].as_row())
    assert read_sr(pydicom.dcmread(writer.written[0])).probability == rows[0].probability


@pytest.fixture(scope="module")
def subtyped(
    tmp_path_factory: pytest.TempPathFactory, subtype_model: Path
) -> tuple[list[Prediction], ReportedModel]:
    made = make_studies(tmp_path_factory.mktemp("subtype-studies"))
    predictor = Predictor.open(subtype_model)
    return list(predictor.predict_files([str(i.path) for i in made])), ReportedModel.of(predictor)


def test_writers_carry_the_subtype_of_pneumonia_decisions(
    subtyped: tuple[list[Prediction], ReportedModel], tmp_path: Path
) -> None:
    rows, model = subtyped
    assert model.subtype_threshold is not None
    pneumonias = [r for r in rows if r.decision == "PNEUMONIA"]
    assert pneumonias and all(r.subtype_estimate in ("bacterial", "viral") for r in pneumonias)
    sr, fhir = SrWriter(tmp_path / "sr", model), FhirWriter(tmp_path / "fhir.ndjson", model)
    for row in rows:
        sr.write(row)
        fhir.write(row)
    sr.close()
    fhir.close()
    for row, path in zip(rows, sr.written, strict=True):
        result = read_sr(pydicom.dcmread(path))
        assert result.subtype_estimate == row.subtype_estimate
        assert result.p_viral == (None if row.p_viral is None else pytest.approx(row.p_viral))
    by_instance = {
        entry["resource"]["identifier"][0]["value"]: entry["resource"]
        for line in fhir.path.read_text(encoding="utf-8").splitlines()
        for entry in json.loads(line)["entry"]
        if entry["resource"]["resourceType"] == "Observation"
    }
    for row in rows:
        observation = by_instance[f"urn:oid:{row.sop_instance_uid}"]
        codes = [c["code"]["coding"][0]["code"] for c in observation.get("component", [])]
        assert ("subtype-estimate" in codes) == (row.decision == "PNEUMONIA")
