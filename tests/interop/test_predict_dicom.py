"""`predict` on DICOM files made from real X-rays (issue 19): the identifiers end to end
(every writer, the API, the service), --anonymise, --fhir, and the series rules of `pacs`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from studies import Instance, make_studies, stored_values, xray
from typer.testing import CliRunner

from pneumoscan.api import Model
from pneumoscan.cli import app
from pneumoscan.data.dicom import IDENTIFIERS, write_dicom
from pneumoscan.errors import InvalidInputError, OutputExistsError
from pneumoscan.inference.prediction import IDENTIFIER_FIELDS, Prediction
from pneumoscan.inference.predictor import Predictor
from pneumoscan.inference.writers import WRITERS, open_writer, read_results
from pneumoscan.serve.app import create_app
from pneumoscan.serve.engine import Engine

runner = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> list[Instance]:
    return make_studies(tmp_path_factory.mktemp("studies"))


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.open()


@pytest.fixture(scope="module")
def rows(made: list[Instance], predictor: Predictor) -> list[Prediction]:
    inputs = [str(i.path) for i in made] + [str(xray("NORMAL", 0))]  # a JPEG: no identifiers
    return list(predictor.predict_files(inputs))


def expected(path: Path) -> dict[str, str]:
    """The identifiers in a DICOM file's header, by Prediction field."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {field: str(ds.get(keyword)) for field, keyword in IDENTIFIERS}


def identifiers(row: Prediction) -> dict[str, str | None]:
    return {field: getattr(row, field) for field in IDENTIFIER_FIELDS}


def test_identifier_fields_agree_between_layers() -> None:
    assert tuple(field for field, _ in IDENTIFIERS) == IDENTIFIER_FIELDS


def test_predict_keeps_the_dicom_identifiers_of_every_decoded_file(
    made: list[Instance], rows: list[Prediction]
) -> None:
    for instance, row in zip(made, rows, strict=False):
        # Pixel data cut short: an error row, which still names the instance it is about.
        assert (row.status == "error") == (instance.expect == "error"), row
        assert identifiers(row) == expected(instance.path), row
        assert row.sop_instance_uid == instance.sop_uid
        assert row.study_instance_uid == instance.study_uid
    assert identifiers(rows[-1]) == dict.fromkeys(IDENTIFIER_FIELDS)  # the JPEG


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_every_writer_keeps_the_identifiers(
    suffix: str, made: list[Instance], rows: list[Prediction], tmp_path: Path
) -> None:
    target = tmp_path / f"results{suffix}"
    writer = open_writer(target)
    for row in rows:
        writer.write(row)
    writer.close()
    back = read_results(target)
    first = made[0]
    assert first.expect == "ok"
    assert {field: back[0][field] for field in IDENTIFIER_FIELDS} == expected(first.path)


def test_the_series_rules_refuse_a_hand_image_unscored(
    made: list[Instance], rows: list[Prediction]
) -> None:
    hand = next(i for i, m in enumerate(made) if m.path.name == "dx-hand.dcm")
    row = rows[hand]
    assert row.status == "rejected" and row.probability is None and row.decision is None
    assert "BodyPartExamined is HAND" in str(row.reason)
    assert row.sop_instance_uid == made[hand].sop_uid


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ({"ViewPosition": "LL"}, "ViewPosition is LL"),
        ({"PresentationIntentType": "FOR PROCESSING"}, "PresentationIntentType is FOR PROC"),
    ],
)
def test_the_series_rules_refuse_laterals_and_raw_images_even_without_the_ood_check(
    extra: dict[str, str], said: str, predictor: Predictor, tmp_path: Path
) -> None:
    path = write_dicom(
        stored_values(xray("PNEUMONIA", 0)), tmp_path / "x.dcm", window=(2048, 4096), extra=extra
    )
    for check in (True, False):
        (row,) = predictor.predict_files([str(path)], ood_check=check)
        assert row.status == "rejected" and row.probability is None, row
        assert said in str(row.reason) and "frontal chest" in str(row.reason)


def invoke(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_anonymise_drops_the_identifiers(made: list[Instance], tmp_path: Path) -> None:
    kept, dropped = tmp_path / "kept.csv", tmp_path / "dropped.jsonl"
    code, out = invoke("predict", made[0].path, "--out", kept)
    assert code == 0, out
    code, out = invoke("predict", made[0].path, "--out", dropped, "--anonymise")
    assert code == 0, out
    assert read_results(kept)[0]["patient_id"] == "PNEUMO-001"
    row = read_results(dropped)[0]
    assert row["status"] == "ok"
    assert all(row.get(field) is None for field in IDENTIFIER_FIELDS), row
    assert "PNEUMO-001" not in dropped.read_text(encoding="utf-8")


def test_cli_fhir_writes_one_valid_bundle_per_study(made: list[Instance], tmp_path: Path) -> None:
    target = tmp_path / "reports.ndjson"
    inputs = [i.path for i in made]
    code, out = invoke("predict", *inputs, "--fhir", target)
    assert code == 0, out
    lines = target.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len({i.study_uid for i in made})
    for line in lines:
        Bundle.model_validate(json.loads(line))
    before = target.read_text(encoding="utf-8")
    code, out = invoke("predict", made[0].path, "--fhir", target)
    assert code == 2 and "already exists" in out and "--overwrite" in out
    assert target.read_text(encoding="utf-8") == before
    code, out = invoke("predict", made[0].path, "--fhir", target, "--overwrite")
    assert code == 0, out
    assert len(target.read_text(encoding="utf-8").splitlines()) == 1
    code, out = invoke("predict", made[0].path, "--fhir", tmp_path / "x.ndjson", "--anonymise")
    assert code == 2 and "--anonymise" in out
    assert not (tmp_path / "x.ndjson").exists()


def test_api_identifiers_anonymise_and_fhir(
    made: list[Instance], predictor: Predictor, tmp_path: Path
) -> None:
    model = Model(predictor)
    first = made[0]
    table = model.predict([first.path])
    assert {field: table.iloc[0][field] for field in IDENTIFIER_FIELDS} == expected(first.path)
    anonymous = model.predict([first.path], anonymise=True)
    assert anonymous.iloc[0]["status"] == "ok"
    assert anonymous[list(IDENTIFIER_FIELDS)].isna().all().all()
    target = tmp_path / "api.ndjson"
    model.predict([first.path], fhir=target)
    (line,) = target.read_text(encoding="utf-8").splitlines()
    bundle = Bundle.model_validate(json.loads(line))
    assert first.study_uid in bundle.model_dump_json()
    with pytest.raises(OutputExistsError):
        model.predict([first.path], fhir=target)
    model.predict([first.path], fhir=target, overwrite=True)
    with pytest.raises(InvalidInputError):
        model.predict([first.path], fhir=tmp_path / "y.ndjson", anonymise=True)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    engine = Engine.load()
    with TestClient(create_app(engine=engine)) as test_client:
        yield test_client
    engine.close()


def test_the_service_gives_identifiers_back_only_when_asked_for_a_dicom_upload(
    made: list[Instance], client: TestClient
) -> None:
    first = made[0]
    dicom = ("files", ("a.dcm", first.path.read_bytes(), "application/dicom"))
    jpeg = ("files", ("b.jpeg", xray("NORMAL", 0).read_bytes(), "image/jpeg"))
    plain = client.post("/v1/predict", files=[dicom, jpeg]).json()["results"]
    asked = client.post("/v1/predict?identifiers=true", files=[dicom, jpeg]).json()["results"]
    assert [r["status"] for r in plain] == ["ok", "ok"] == [r["status"] for r in asked]
    for result in (*plain, asked[1]):
        assert all(result[field] is None for field in IDENTIFIER_FIELDS), result
    assert {field: asked[0][field] for field in IDENTIFIER_FIELDS} == expected(first.path)
    hand = next(m for m in made if m.path.name == "dx-hand.dcm")
    files = [("files", ("h.dcm", hand.path.read_bytes(), "application/dicom"))]
    (refused,) = client.post("/v1/predict", files=files).json()["results"]
    assert refused["status"] == "rejected" and refused["probability"] is None
    assert "BodyPartExamined is HAND" in refused["reason"]
    corrupt = next(m for m in made if m.expect == "error")
    files = [("files", ("c.dcm", corrupt.path.read_bytes(), "application/dicom"))]
    (quiet,) = client.post("/v1/predict", files=files).json()["results"]
    (named,) = client.post("/v1/predict?identifiers=true", files=files).json()["results"]
    assert quiet["status"] == named["status"] == "error"
    assert quiet["sop_instance_uid"] is None and named["sop_instance_uid"] == corrupt.sop_uid
