"""FHIR R4 bundles of a study's results, validated by fhir.resources."""

from __future__ import annotations

import pydicom
import pytest
from fhir.resources.R4B.bundle import Bundle
from studies import make_studies
from test_sr import HAND, MODEL, NORMAL, SCORED, SUBTYPED

from pneumoscan.interop.fhir import study_bundle
from pneumoscan.interop.records import ImageResult
from pneumoscan.models.subtype import SUBTYPE_LABEL


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[pydicom.Dataset]:
    made = make_studies(tmp_path_factory.mktemp("studies"))
    return [pydicom.dcmread(i.path) for i in made if i.study_uid == made[-1].study_uid]


def _resources(bundle: dict) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for entry in bundle["entry"]:
        found.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    return found


def test_one_study_bundle(sources: list[pydicom.Dataset]) -> None:
    chest, hand = sources
    bundle = study_bundle([(SCORED, chest), (HAND, hand)], MODEL, issued="2026-01-02T10:00:00Z")
    Bundle.model_validate(bundle)
    found = _resources(bundle)
    assert {k: len(v) for k, v in found.items()} == {
        "DiagnosticReport": 1, "Observation": 2, "Device": 1, "ImagingStudy": 1,
    }  # fmt: skip
    report, (scored, refused) = found["DiagnosticReport"][0], found["Observation"]
    assert report["code"]["coding"][0] == {
        "system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study",
    }  # fmt: skip
    assert len(report["result"]) == 2 and report["imagingStudy"][0]["reference"].startswith("urn:")
    assert scored["valueQuantity"]["value"] == pytest.approx(SCORED.probability)
    assert scored["interpretation"][0]["coding"][0]["code"] == "POS"
    assert "valueQuantity" not in refused and "HAND" in refused["dataAbsentReason"]["text"]
    device = found["Device"][0]
    assert {v["value"] for v in device["version"]} == {MODEL.version, MODEL.sha256}
    study = found["ImagingStudy"][0]
    assert study["identifier"][0]["value"] == f"urn:oid:{chest.StudyInstanceUID}"
    assert study["numberOfInstances"] == 2 and study["numberOfSeries"] == 2
    assert study["subject"]["identifier"]["value"] == chest.PatientID


def test_same_results_give_the_same_ids(sources: list[pydicom.Dataset]) -> None:
    items = [(SCORED, sources[0])]
    first = study_bundle(items, MODEL, issued="2026-01-02T10:00:00Z")
    assert study_bundle(items, MODEL, issued="2026-01-02T10:00:00Z") == first


def test_one_study_per_bundle(tmp_path_factory: pytest.TempPathFactory) -> None:
    made = make_studies(tmp_path_factory.mktemp("more"))
    two = [(SCORED, pydicom.dcmread(made[0].path)), (SCORED, pydicom.dcmread(made[1].path))]
    with pytest.raises(ValueError, match="one study per FHIR report"):
        study_bundle(two, MODEL)
    with pytest.raises(ValueError, match="at least one"):
        study_bundle([], MODEL)


def _component(observation: dict, code: str) -> list[dict]:
    return [c for c in observation.get("component", []) if c["code"]["coding"][0]["code"] == code]


def test_a_pneumonia_with_a_subtype_gets_p_viral_and_the_call(
    sources: list[pydicom.Dataset],
) -> None:
    chest, hand = sources
    bundle = study_bundle([(SUBTYPED, chest), (HAND, hand)], MODEL, issued="2026-01-02T10:00:00Z")
    Bundle.model_validate(bundle)
    subtyped, refused = _resources(bundle)["Observation"]
    (p_viral,) = _component(subtyped, "p-viral")
    assert p_viral["valueQuantity"]["value"] == pytest.approx(0.71)
    assert p_viral["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    (call,) = _component(subtyped, "subtype-estimate")
    assert call["valueCodeableConcept"]["coding"] == [
        {"system": "http://snomed.info/sct", "code": "75570004", "display": "Viral pneumonia"}
    ]
    assert SUBTYPE_LABEL in call["valueCodeableConcept"]["text"]
    notes = [n["text"] for n in subtyped["note"]]
    assert any(SUBTYPE_LABEL in n and "subtype threshold 0.350000" in n for n in notes)
    assert any(MODEL.subtype_rule in n for n in notes if MODEL.subtype_rule)
    # The pneumonia finding and its value are unchanged.
    assert subtyped["valueQuantity"]["value"] == pytest.approx(SUBTYPED.probability)
    assert _component(subtyped, "233604007")[0]["valueCodeableConcept"]["coding"][0]["code"] == (
        "52101004"
    )
    assert "component" not in refused and "subtype" not in str(refused)


@pytest.mark.parametrize("result", [SCORED, NORMAL], ids=["no-subtype", "normal"])
def test_no_subtype_without_a_subtyped_pneumonia(
    sources: list[pydicom.Dataset], result: ImageResult
) -> None:
    bundle = study_bundle([(result, sources[0])], MODEL, issued="2026-01-02T10:00:00Z")
    (observation,) = _resources(bundle)["Observation"]
    assert not _component(observation, "p-viral") and not _component(
        observation, "subtype-estimate"
    )
    assert len(observation["component"]) == 2 and len(observation["note"]) == 1
    assert SUBTYPE_LABEL not in str(bundle) and "75570004" not in str(bundle)
