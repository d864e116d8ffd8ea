"""SR and FHIR writers fed with predict's own rows for DICOM files."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from studies import Instance, make_studies, xray

import pneumoscan
from pneumoscan.inference.backends import open_model
from pneumoscan.interop.records import ReportedModel
from pneumoscan.interop.sr import read_sr
from pneumoscan.interop.writers import FhirWriter, SrWriter


@pytest.fixture(scope="module")
def scored(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[list[Instance], list[dict], ReportedModel]:
    made = make_studies(tmp_path_factory.mktemp("studies"))
    model = pneumoscan.load()
    inputs = [str(i.path) for i in made] + [str(xray("NORMAL", 0))]  # a JPEG: no study
    rows = model.predict(inputs).to_dict("records")
    return made, rows, ReportedModel.of(open_model(None, "auto")[0])


def test_sr_writer_writes_one_sr_per_dicom_input(
    scored: tuple[list[Instance], list[dict], ReportedModel], tmp_path: Path
) -> None:
    made, rows, model = scored
    writer = SrWriter(tmp_path / "sr", model)
    for row in rows:
        writer.write(row)
    writer.close()
    assert len(writer.written) == len(made) and writer.skipped == [rows[-1]["path"]]
    for instance, row, path in zip(made, rows, writer.written, strict=False):
        result = read_sr(pydicom.dcmread(path))
        if row["status"] == "ok":
            assert result.probability == pytest.approx(row["probability"], abs=1e-6)
        else:
            assert result.probability is None and result.reason
        assert pydicom.dcmread(path).StudyInstanceUID == instance.study_uid


def test_fhir_writer_writes_one_bundle_per_study(
    scored: tuple[list[Instance], list[dict], ReportedModel], tmp_path: Path
) -> None:
    made, rows, model = scored
    writer = FhirWriter(tmp_path / "fhir.ndjson", model)
    for row in rows:
        writer.write(row)
    writer.close()
    lines = writer.path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len({i.study_uid for i in made})
    for line in lines:
        Bundle.model_validate(json.loads(line))
