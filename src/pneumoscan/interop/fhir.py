"""A study's results as FHIR R4 resources: one ``Bundle`` (type ``collection``) per study
holding a ``DiagnosticReport``, an ``Observation`` per image, the model's ``Device`` and the
``ImagingStudy`` they were read from, validated by ``fhir.resources`` (its R4B models: R4B
changed none of these resources' elements used here).

Pure functions of the results, the source images' DICOM headers and the model's identity;
resource ids are derived from the study UID and the model's hash, so the same results always
give the same bundle (apart from ``issued``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydicom.dataset import Dataset

from pneumoscan.constants import CLASSES
from pneumoscan.interop.records import ImageResult, ReportedModel
from pneumoscan.models.modelfile import now_utc
from pneumoscan.models.subtype import BACTERIAL, SUBTYPE_LABEL, VIRAL

#: The project's code system, for concepts no LOINC or SNOMED CT code fits.
PNEUMOSCAN_SYSTEM = "urn:pneumoscan:fhir:codes"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
DICOM_UID = "urn:dicom:uid"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
_ID_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
#: LOINC 18748-4 "Diagnostic imaging study"; category LP29684-5 "Radiology".
REPORT_CODE = {"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}
RADIOLOGY = {"system": LOINC, "code": "LP29684-5", "display": "Radiology"}
P_PNEUMONIA = {"system": PNEUMOSCAN_SYSTEM, "code": "p-pneumonia", "display": "P(pneumonia)"}
THRESHOLD = {"system": PNEUMOSCAN_SYSTEM, "code": "threshold", "display": "Operating threshold"}
PNEUMONIA = {"system": SNOMED, "code": "233604007", "display": "Pneumonia"}
PRESENT = {"system": SNOMED, "code": "52101004", "display": "Present"}
ABSENT = {"system": SNOMED, "code": "2667000", "display": "Absent"}
NOTICE = "pneumoscan: AI triage support, not a diagnosis; a radiologist reads every image."
P_VIRAL = {"system": PNEUMOSCAN_SYSTEM, "code": "p-viral", "display": "P(viral pneumonia)"}
SUBTYPE = {
    "system": PNEUMOSCAN_SYSTEM,
    "code": "subtype-estimate",
    "display": "Pneumonia subtype estimate",
}
SUBTYPE_CODES = {
    BACTERIAL: {"system": SNOMED, "code": "53084003", "display": "Bacterial pneumonia"},
    VIRAL: {"system": SNOMED, "code": "75570004", "display": "Viral pneumonia"},
}


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "/".join(parts)))


def _oid(uid: str) -> str:
    return f"urn:oid:{uid}"


def _quantity(value: float) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": "1", "system": UCUM, "code": "1"}


def _subject(source: Dataset) -> dict[str, Any]:
    """The patient by the identifier the PACS knows them by (no Patient resource is made)."""
    patient_id = str(source.get("PatientID", "") or "")
    if patient_id:
        return {"identifier": {"value": patient_id}, "display": f"patient {patient_id}"}
    return {"display": "patient without an identifier in the DICOM header"}


def device(model: ReportedModel) -> dict[str, Any]:
    """The model as a FHIR ``Device``: its file name, pneumoscan version and SHA-256."""
    return {
        "resourceType": "Device",
        "id": _uuid("device", model.sha256),
        "identifier": [{"system": f"{PNEUMOSCAN_SYSTEM}:model-sha256", "value": model.sha256}],
        "manufacturer": "pneumoscan",
        "deviceName": [{"name": model.name, "type": "model-name"}],
        "type": {"text": "AI triage software: pneumonia on pediatric frontal chest X-rays"},
        "version": [
            {"type": {"text": "pneumoscan"}, "value": model.version},
            {"type": {"text": "model SHA-256"}, "value": model.sha256},
        ],
    }


def imaging_study(sources: Sequence[Dataset]) -> dict[str, Any]:
    """The ``ImagingStudy`` of the source images (one study), with their series and
    instances."""
    first = sources[0]
    study_uid = str(first.StudyInstanceUID)
    series: dict[str, dict[str, Any]] = {}
    for source in sources:
        uid = str(source.SeriesInstanceUID)
        entry = series.setdefault(
            uid,
            {
                "uid": uid,
                "modality": {"system": DCM, "code": str(source.get("Modality", "") or "OT")},
                "instance": [],
            },
        )
        entry["instance"].append(
            {
                "uid": str(source.SOPInstanceUID),
                "sopClass": {"system": "urn:ietf:rfc:3986", "code": _oid(str(source.SOPClassUID))},
            }
        )
    identifiers: list[dict[str, Any]] = [{"system": DICOM_UID, "value": _oid(study_uid)}]
    accession = str(first.get("AccessionNumber", "") or "")
    if accession:
        identifiers.append(
            {"type": {"coding": [{"system": _ID_TYPE, "code": "ACSN"}]}, "value": accession}
        )
    return {
        "resourceType": "ImagingStudy",
        "id": _uuid("imaging-study", study_uid),
        "identifier": identifiers,
        "status": "available",
        "subject": _subject(first),
        "numberOfSeries": len(series),
        "numberOfInstances": len(sources),
        "series": list(series.values()),
    }


def observation(
    result: ImageResult, source: Dataset, model: ReportedModel, refs: dict[str, str]
) -> dict[str, Any]:
    """One image's result as an ``Observation``: P(pneumonia) as its value, the decision
    (Pneumonia present or absent) and the threshold as components; or, for an image that was
    not scored, no value and the reason. A PNEUMONIA decision with a subtype estimate also
    gets P(viral) and the call as components, and a note saying what the call is."""
    instance = str(source.SOPInstanceUID)
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _uuid("observation", instance, model.sha256),
        "identifier": [{"system": DICOM_UID, "value": _oid(instance)}],
        # AI output nobody has verified yet: preliminary, as the SR's verification flag says.
        "status": "preliminary",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "imaging",
                    }
                ]
            }
        ],
        "code": {"coding": [P_PNEUMONIA], "text": "Probability of pneumonia (pneumoscan)"},
        "subject": _subject(source),
        "device": {"reference": refs["device"]},
        "derivedFrom": [{"reference": refs["study"]}],
        "note": [{"text": f"DICOM SOP Instance UID {instance}. {NOTICE}"}],
    }
    if result.scored:
        assert result.probability is not None  # scored implies a probability
        threshold = model.threshold if result.threshold is None else result.threshold
        present = result.decision == CLASSES[1]
        resource["valueQuantity"] = _quantity(result.probability)
        resource["interpretation"] = [
            {"coding": [{"system": _INTERPRETATION, "code": "POS" if present else "NEG"}]}
        ]
        resource["component"] = [
            {
                "code": {"coding": [PNEUMONIA]},
                "valueCodeableConcept": {"coding": [PRESENT if present else ABSENT]},
            },
            {"code": {"coding": [THRESHOLD]}, "valueQuantity": _quantity(threshold)},
        ]
        if result.has_subtype:
            resource["component"].extend(_subtype_components(result))
            resource["note"].append({"text": _subtype_note(model)})
    else:
        code = "error" if result.status == "error" else "not-applicable"
        resource["dataAbsentReason"] = {
            "coding": [{"system": _ABSENT_REASON, "code": code}],
            "text": result.reason or "not scored",
        }
    return resource


def _subtype_components(result: ImageResult) -> list[dict[str, Any]]:
    assert result.p_viral is not None and result.subtype_estimate is not None
    return [
        {"code": {"coding": [P_VIRAL]}, "valueQuantity": _quantity(result.p_viral)},
        {
            "code": {"coding": [SUBTYPE], "text": f"Pneumonia subtype: {SUBTYPE_LABEL}"},
            "valueCodeableConcept": {
                "coding": [SUBTYPE_CODES[result.subtype_estimate]],
                "text": f"{result.subtype_estimate} ({SUBTYPE_LABEL})",
            },
        },
    ]


def _subtype_note(model: ReportedModel) -> str:
    """The note beside a subtype call: what it is not, and the rule that made it."""
    rule = "; ".join(model.subtype_parameters())
    return f"Bacterial-or-viral subtype: {SUBTYPE_LABEL}." + (f" {rule}." if rule else "")


def _conclusion(results: Sequence[ImageResult], model: ReportedModel) -> str:
    flagged = sum(r.scored and r.decision == CLASSES[1] for r in results)
    scored = sum(r.scored for r in results)
    refused = len(results) - scored
    text = (
        f"{flagged} of {scored} scored images flagged for pneumonia by pneumoscan "
        f"({model.name}, threshold {model.threshold:.4f})"
    )
    if refused:
        text += f"; {refused} not scored (see each observation)"
    return f"{text}. {NOTICE}"


def study_bundle(
    items: Sequence[tuple[ImageResult, Dataset]],
    model: ReportedModel,
    issued: str | None = None,
) -> dict[str, Any]:
    """A ``collection`` Bundle of one study's results, validated by ``fhir.resources``.

    Args:
        items: ``(result, source DICOM header)`` for each image of one study.
        model: The model that scored them.
        issued: When the report was made (default: now, UTC).

    Raises:
        ValueError: No items, items of several studies, or a resource FHIR R4 rejects.
    """
    if not items:
        raise ValueError("a FHIR report needs at least one result")
    sources = [source for _, source in items]
    study_uids = {str(source.StudyInstanceUID) for source in sources}
    if len(study_uids) != 1:
        raise ValueError(f"one study per FHIR report, got {len(study_uids)}")
    study = imaging_study(sources)
    model_device = device(model)
    refs = {
        "device": f"urn:uuid:{model_device['id']}",
        "study": f"urn:uuid:{study['id']}",
    }
    observations = [observation(result, source, model, refs) for result, source in items]
    report = {
        "resourceType": "DiagnosticReport",
        "id": _uuid("report", study_uids.pop(), model.sha256),
        "status": "preliminary",
        "category": [{"coding": [RADIOLOGY]}],
        "code": {"coding": [REPORT_CODE], "text": "Pneumonia triage (pneumoscan)"},
        "subject": _subject(sources[0]),
        "issued": issued or now_utc(),
        "result": [{"reference": f"urn:uuid:{o['id']}"} for o in observations],
        "imagingStudy": [{"reference": refs["study"]}],
        "conclusion": _conclusion([result for result, _ in items], model),
    }
    resources = [report, *observations, model_device, study]
    bundle = {
        "resourceType": "Bundle",
        "id": _uuid("bundle", str(report["id"])),
        "type": "collection",
        "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources],
    }
    validated = Bundle.model_validate(bundle)
    return json.loads(validated.model_dump_json())
