"""Results writers for DICOM inputs: a DICOM SR file per image, a FHIR bundle per study.

Both are :class:`pneumoscan.inference.writers.ResultWriter` s (``path``,
``write(prediction)``, ``close(complete=True)``), so ``predict`` can hand them its predictions
as it hands them to the CSV or JSON lines writer. A prediction may be the typed
:class:`~pneumoscan.inference.prediction.Prediction` or a results row (a mapping); its ``path``
must name the DICOM file it came from, whose header supplies the patient, study and instance.
Inputs that are not DICOM files have no study to report to: they are listed in ``skipped``,
not written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from pneumoscan.errors import InvalidInputError, OutputExistsError
from pneumoscan.inference.prediction import Prediction
from pneumoscan.interop.fhir import study_bundle
from pneumoscan.interop.records import ImageResult, ReportedModel
from pneumoscan.interop.sr import build_sr
from pneumoscan.jsonio import atomic_write

if TYPE_CHECKING:
    from pneumoscan.inference.writers import ResultWriter


def _row(prediction: Prediction | Mapping[str, Any]) -> Mapping[str, Any]:
    return prediction.as_row() if isinstance(prediction, Prediction) else prediction


def dicom_header(path: str | Path) -> Dataset | None:
    """The DICOM header of a file (no pixels), or ``None`` when it is not a readable DICOM
    file with the UIDs a report needs."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, KeyError, EOFError):
        return None
    needed = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
    return ds if all(keyword in ds for keyword in needed) else None


def _with_header(
    prediction: Prediction | Mapping[str, Any], skipped: list[str]
) -> tuple[Mapping[str, Any], Dataset] | None:
    """The prediction's row and its input's DICOM header; ``None`` (the path noted in
    ``skipped``) when the input is not DICOM."""
    row = _row(prediction)
    source = dicom_header(str(row.get("path", "")))
    if source is None:
        skipped.append(str(row.get("path")))
        return None
    return row, source


class SrWriter:
    """One DICOM Comprehensive SR file per DICOM input, in a folder, named by the SR's SOP
    Instance UID (the same input and model always give the same file).

    Args:
        path: The folder (made if missing).
        model: The model that scored.
    """

    def __init__(self, path: str | Path, model: ReportedModel) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.written: list[Path] = []
        self.skipped: list[str] = []

    def write(self, prediction: Prediction | Mapping[str, Any]) -> None:
        """Write the SR of one prediction (skipped when its input is not DICOM)."""
        found = _with_header(prediction, self.skipped)
        if found is None:
            return
        row, source = found
        report = build_sr(ImageResult.from_row(row), source, self.model)
        target = self.path / f"{report.SOPInstanceUID}.dcm"
        with atomic_write(target) as partial:
            report.save_as(partial, enforce_file_format=True)
        self.written.append(target)

    def close(self, complete: bool = True) -> None:
        """Nothing to finish: each SR is written whole when its prediction comes."""


class FhirWriter:
    """One FHIR R4 bundle per study, one JSON line each (NDJSON), written atomically when the
    run ends; studies in the order their first image came.

    Args:
        path: The ``.ndjson`` file.
        model: The model that scored.
    """

    def __init__(self, path: str | Path, model: ReportedModel) -> None:
        self.path = Path(path)
        self.model = model
        self.studies: dict[str, list[tuple[ImageResult, Dataset]]] = {}
        self.skipped: list[str] = []

    def write(self, prediction: Prediction | Mapping[str, Any]) -> None:
        """Keep one prediction for its study's bundle (skipped when its input is not DICOM)."""
        found = _with_header(prediction, self.skipped)
        if found is None:
            return
        row, source = found
        study = str(source.StudyInstanceUID)
        self.studies.setdefault(study, []).append((ImageResult.from_row(row), source))

    def close(self, complete: bool = True) -> None:
        """Write every study's bundle (a run that stopped early writes the studies it has)."""
        lines = [json.dumps(study_bundle(items, self.model)) for items in self.studies.values()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.path) as partial:
            partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def open_fhir_writer(
    path: str | Path, model: ReportedModel, *, overwrite: bool = False
) -> FhirWriter:
    """The :class:`FhirWriter` of ``predict --fhir`` (and the API's ``fhir=``), its file
    checked (:func:`check_fhir_output`) before any work starts, as every results file is."""
    check_fhir_output(path, overwrite=overwrite)
    return FhirWriter(path, model)


def check_fhir_output(path: str | Path, *, overwrite: bool = False) -> None:
    """Check that a FHIR NDJSON file may be written.

    Raises:
        InvalidInputError: The file does not end in ``.ndjson``, or is a folder.
        OutputExistsError: The file exists and not ``overwrite``.
    """
    path = Path(path)
    if path.suffix.lower() != ".ndjson":
        raise InvalidInputError(
            f"{path}: a FHIR file must end in .ndjson (one R4 Bundle per study, one per line)"
        )
    if path.is_dir():
        raise InvalidInputError(f"{path}: a folder; give a file name for the FHIR bundles")
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} already exists: pass --overwrite to replace it, or choose another file"
        )


if TYPE_CHECKING:

    def _results_writers(sr: SrWriter, fhir: FhirWriter) -> tuple[ResultWriter, ResultWriter]:
        """Checked by mypy: both writers are results writers."""
        return sr, fhir
