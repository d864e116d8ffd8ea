"""One image's result as a DICOM Comprehensive SR (TID 1500 measurement report), with highdicom.

The report is a pure function of the result, the source image's DICOM header and the model's
identity (:func:`build_sr`): it references the source instance, copies its patient and study
attributes (highdicom does, from the evidence), and holds

- P(pneumonia) and the operating threshold as numeric measurements (UCUM ``1``);
- the decision as a qualitative evaluation: Pneumonia (SCT 233604007) present or absent;
- the model as a device observer (name, SHA-256 as its serial number) and as the algorithm
  of the measurement group (TID 4019: name, pneumoscan version, and the SHA-256, threshold and
  threshold rule as parameters);
- for an image that was not scored: the qualitative evaluation *indeterminate*, no
  probability, and the reason as text (refused, or unreadable);
- for a PNEUMONIA decision of a model with a bacterial-or-viral head, beside the pneumonia
  finding: P(viral) as a numeric measurement, the call as a qualitative evaluation (Bacterial
  pneumonia, SCT 53084003, or Viral pneumonia, SCT 75570004), a comment saying it is an
  estimate, not a microbiological diagnosis, and the head's threshold and rule as algorithm
  parameters. NORMAL, refused and unreadable images carry none of it.

Its Series and SOP Instance UIDs are derived from the study, the source instance and the
model's hash (:func:`sr_uids`), so the same result always has the same UIDs: storing it twice
changes nothing, and a PACS run can tell what it already wrote.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pneumoscan.constants import CLASSES
from pneumoscan.interop.records import UID_PREFIX, ImageResult, ReportedModel
from pneumoscan.models.subtype import BACTERIAL, SUBTYPE_LABEL, VIRAL

#: The project's own coding scheme, for concepts no public code fits (DICOM reserves scheme
#: designators starting with 99 for local schemes).
CODING_SCHEME = "99PNEUMOSCAN"
P_PNEUMONIA = hd.sr.CodedConcept("P-PNEUMONIA", CODING_SCHEME, "Probability of pneumonia")
THRESHOLD = hd.sr.CodedConcept("THRESHOLD", CODING_SCHEME, "Operating threshold")
#: Why an image has no probability: refused (not a frontal chest X-ray) or unreadable.
REFUSED = hd.sr.CodedConcept("REFUSED", CODING_SCHEME, "Not scored: not a frontal chest X-ray")
UNREADABLE = hd.sr.CodedConcept("UNREADABLE", CODING_SCHEME, "Not scored: image unreadable")
PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
INDETERMINATE = hd.sr.CodedConcept("82334004", "SCT", "Indeterminate")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
P_VIRAL = hd.sr.CodedConcept("P-VIRAL", CODING_SCHEME, "Probability of viral pneumonia")
#: The call's concept name is local: SNOMED CT has no "bacterial or viral" observable, and
#: naming it Pneumonia would clash with the present/absent evaluation readers look up.
SUBTYPE = hd.sr.CodedConcept("SUBTYPE", CODING_SCHEME, "Pneumonia subtype estimate")
SUBTYPE_CODES = {
    BACTERIAL: hd.sr.CodedConcept("53084003", "SCT", "Bacterial pneumonia"),
    VIRAL: hd.sr.CodedConcept("75570004", "SCT", "Viral pneumonia"),
}
#: What the comment beside the call says (SUBTYPE_LABEL, with what it is about).
SUBTYPE_NOTE = f"Bacterial-or-viral subtype: {SUBTYPE_LABEL}"

MANUFACTURER = "pneumoscan"
#: Series number and description of the results series each study gets.
SERIES_NUMBER = 9900
SERIES_DESCRIPTION = "pneumoscan AI triage result (not a diagnosis)"
TRACKING_IDENTIFIER = "pneumoscan pneumonia triage"


#: Patient and study attributes an SR copies from its source (type 2: present, maybe empty).
_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip


def evidence_header(source: Dataset) -> Dataset:
    """The source's header without its pixels, with every copied attribute present (empty
    where the source lacks it: a DICOM type 2 attribute may be empty, never absent)."""
    header = Dataset()
    for element in source:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            header.add(element)
    for keyword in _COPIED:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def results_series_uid(study_uid: str, model_sha256: str) -> str:
    """The results series of a study for a model: one per study and model."""
    return str(
        generate_uid(UID_PREFIX, entropy_srcs=["pneumoscan-series", study_uid, model_sha256])
    )


def sr_instance_uid(source_instance_uid: str, model_sha256: str) -> str:
    """The SR of a source instance by a model: one per instance and model."""
    return str(
        generate_uid(UID_PREFIX, entropy_srcs=["pneumoscan-sr", source_instance_uid, model_sha256])
    )


def sr_uids(source: Dataset, model: ReportedModel) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of the SR for ``source`` by ``model``."""
    return (
        results_series_uid(str(source.StudyInstanceUID), model.sha256),
        sr_instance_uid(str(source.SOPInstanceUID), model.sha256),
    )


def device_uid(model: ReportedModel) -> str:
    """A UID for the model as a DICOM device observer, derived from its file's hash."""
    return str(generate_uid(UID_PREFIX, entropy_srcs=["pneumoscan-device", model.sha256]))


def _algorithm(
    model: ReportedModel, threshold: float, subtype: bool
) -> hd.sr.AlgorithmIdentification:
    parameters = [f"model SHA-256 {model.sha256}", f"threshold {threshold:.6f}"]
    if model.threshold_rule:
        parameters.append(f"threshold rule: {model.threshold_rule}")
    if subtype:
        parameters.extend(model.subtype_parameters())
    return hd.sr.AlgorithmIdentification(
        name=f"pneumoscan {model.name}",
        version=model.version,
        parameters=parameters,
        manufacturer=MANUFACTURER,
    )


def _observation_context(model: ReportedModel) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=device_uid(model),
        name="pneumoscan",
        manufacturer_name=MANUFACTURER,
        model_name=model.name[:64],
        serial_number=model.sha256[:64],
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _measurement_group(
    result: ImageResult, source: Dataset, model: ReportedModel
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    threshold = model.threshold if result.threshold is None else result.threshold
    measurements: list[hd.sr.Measurement] = []
    evaluations: list[hd.sr.QualitativeEvaluation] = []
    if result.scored:
        assert result.probability is not None  # scored implies a probability
        measurements = [
            hd.sr.Measurement(name=P_PNEUMONIA, value=float(result.probability), unit=UNITLESS),
            hd.sr.Measurement(name=THRESHOLD, value=float(threshold), unit=UNITLESS),
        ]
        present = (result.decision or "") == CLASSES[1]
        evaluation = PRESENT if present else ABSENT
    else:
        evaluation = INDETERMINATE
    evaluations.append(hd.sr.QualitativeEvaluation(PNEUMONIA, evaluation))
    if result.has_subtype:
        assert result.p_viral is not None and result.subtype_estimate is not None
        measurements.append(
            hd.sr.Measurement(name=P_VIRAL, value=float(result.p_viral), unit=UNITLESS)
        )
        evaluations.append(
            hd.sr.QualitativeEvaluation(SUBTYPE, SUBTYPE_CODES[result.subtype_estimate])
        )
    instance = str(source.SOPInstanceUID)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(UID_PREFIX, entropy_srcs=["pneumoscan-tracking", instance]),
            identifier=TRACKING_IDENTIFIER,
        ),
        finding_type=PNEUMONIA,
        algorithm_id=_algorithm(model, threshold, result.has_subtype),
        measurements=measurements or None,
        qualitative_evaluations=evaluations,
        # From the UIDs, not from_source_image: an image whose pixel attributes are damaged
        # still gets its SR (saying why it was not scored).
        source_images=[hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), instance)],
    )
    if not result.scored:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=UNREADABLE if result.status == "error" else REFUSED,
                value=result.reason or "not scored",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    if result.has_subtype:
        # Said in the report itself, so no reader of the SR sees the call without it.
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=SUBTYPE_NOTE,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    return group


def build_sr(
    result: ImageResult,
    source: Dataset,
    model: ReportedModel,
    *,
    instance_number: int = 1,
) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR (TID 1500) holding one image's result.

    Args:
        result: The image's result (scored, or refused with a reason).
        source: The source image's DICOM header (pixel data not needed); its patient and
            study attributes are copied, and the SR references it.
        model: The model that scored it.
        instance_number: Instance Number of the SR within the study's results series.

    Returns:
        The SR as a pydicom data set (``save_as`` writes it; STOW-RS stores it).
    """
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(model),
        procedure_reported=CHEST_XRAY,
        imaging_measurements=[_measurement_group(result, source, model)],
    )
    series_uid, sop_uid = sr_uids(source, model)
    document = hd.sr.ComprehensiveSR(
        evidence=[evidence_header(source)],
        content=report,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=model.name[:64],
        software_versions=f"pneumoscan {model.version}",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    # The local coding scheme is declared, so a reader knows whose codes these are.
    scheme = Dataset()
    scheme.CodingSchemeDesignator = CODING_SCHEME
    scheme.CodingSchemeName = "pneumoscan result concepts"
    scheme.CodingSchemeResponsibleOrganization = "pneumoscan developers"
    document.CodingSchemeIdentificationSequence = [scheme]
    return document


def read_sr(ds: Dataset) -> ImageResult:
    """The result an SR written by :func:`build_sr` holds (read back with highdicom).

    Raises:
        ValueError: Not such an SR (no pneumoscan measurement group).
    """
    report = hd.sr.ComprehensiveSR.from_dataset(ds, copy=True)
    content = report.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError(f"SR {ds.SOPInstanceUID} is not a TID 1500 measurement report")
    groups = content.get_image_measurement_groups(finding_type=PNEUMONIA)
    if not groups:
        raise ValueError(f"SR {ds.SOPInstanceUID} holds no pneumoscan measurement group")
    group = groups[0]
    probability = group.get_measurements(name=P_PNEUMONIA)
    threshold = group.get_measurements(name=THRESHOLD)
    evaluations = group.get_qualitative_evaluations(name=PNEUMONIA)
    if probability:
        present = bool(evaluations) and evaluations[0].value == PRESENT
        p_viral = group.get_measurements(name=P_VIRAL)
        calls = group.get_qualitative_evaluations(name=SUBTYPE)
        call = next((k for k, c in SUBTYPE_CODES.items() if calls and calls[0].value == c), None)
        return ImageResult(
            status="ok",
            probability=float(probability[0].value),
            decision=CLASSES[1] if present else CLASSES[0],
            threshold=float(threshold[0].value) if threshold else None,
            p_viral=float(p_viral[0].value) if p_viral and call else None,
            subtype_estimate=call if p_viral else None,
        )
    for item in group[0].ContentSequence:
        code = item.ConceptNameCodeSequence[0].CodeValue
        if item.ValueType == "TEXT" and code in (REFUSED.value, UNREADABLE.value):
            status = "error" if code == UNREADABLE.value else "rejected"
            return ImageResult.refused(str(item.TextValue), status)
    return ImageResult.refused("not scored")
