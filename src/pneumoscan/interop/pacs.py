"""The PACS round trip over DICOMweb: find, retrieve, score, store the result back.

One pass (:meth:`PacsRunner.run_once`):

1. QIDO-RS finds the studies with DX or CR images (from ``since`` on, if given);
2. for each, QIDO-RS lists its DX/CR instances and the SRs pneumoscan already stored for this
   model (a results series whose UIDs derive from the study, the instance and the model's hash,
   :func:`pneumoscan.interop.sr.sr_uids`); instances that have an SR are done;
3. WADO-RS retrieves the others in their stored transfer syntax; an image that is not a frontal
   chest radiograph (:mod:`.selection`) is refused with the reason, the rest are decoded and
   scored exactly as ``pneumoscan predict`` scores a file (the same decoder, forward pass, OOD
   check and decision); an image that cannot be read gets its reason;
4. STOW-RS stores one SR per instance back into the study (and, with a FHIR file, one bundle
   per study is appended to it).

Idempotent and resumable by construction: the SR's UIDs are fixed by what it describes, so a
second pass finds nothing to do, a pass that stopped half way redoes only what is missing, and
a retried store can only store the same instance again. A PACS that is down or answers 5xx is
retried with exponential backoff (:class:`RetryPolicy`), then reported.
"""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter

from pneumoscan.data.preprocess import DecodedImage, try_decode_image
from pneumoscan.data.selection import MODALITIES, refusal
from pneumoscan.errors import InvalidInputError, PneumoscanError
from pneumoscan.inference.predict import write_heatmaps
from pneumoscan.inference.prediction import Prediction
from pneumoscan.inference.predictor import Predictor
from pneumoscan.interop.fhir import study_bundle
from pneumoscan.interop.overlay import build_overlay_sc
from pneumoscan.interop.records import ImageResult, ReportedModel
from pneumoscan.interop.sr import build_sr, results_series_uid, sr_instance_uid

#: Environment variables holding PACS credentials: a bearer token, or a user and password,
#: or the path of a JSON file holding either (``{"token": ...}`` or ``{"username": ...,
#: "password": ...}``).
TOKEN_ENV = "PNEUMOSCAN_PACS_TOKEN"
USER_ENV = "PNEUMOSCAN_PACS_USER"
PASSWORD_ENV = "PNEUMOSCAN_PACS_PASSWORD"
CREDENTIALS_ENV = "PNEUMOSCAN_PACS_CREDENTIALS"
#: Seconds to connect and to wait for each answer: a PACS that hangs is a PACS that is down.
TIMEOUT = (10.0, 120.0)
#: Retrieve instances as stored (no transcoding by the PACS).
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)

T = TypeVar("T")


#: Makes one picture (``(H, W, 3)`` uint8, or ``None``) per decoded image from its prediction.
OverlayMaker = Callable[[Sequence[DecodedImage], Sequence[Prediction]], list[np.ndarray | None]]


class GradcamOverlays:
    """Grad-CAM overlays of scored images, drawn exactly as ``predict --heatmaps`` draws them
    (:func:`pneumoscan.inference.predict.write_heatmaps`: the evidence for each image's own
    decision, the score read against the operating point in the title), on the predictor's
    Keras network, loaded on first use; it never scores.
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def __call__(
        self, decoded: Sequence[DecodedImage], predictions: Sequence[Prediction]
    ) -> list[np.ndarray | None]:
        if not any(p.status == "ok" for p in predictions):
            return [None] * len(decoded)
        with tempfile.TemporaryDirectory(prefix="pneumoscan-overlays-") as folder:
            drawn = write_heatmaps(
                self.predictor.network, decoded, predictions,
                [p.path for p in predictions], Path(folder),
            )  # fmt: skip
            return [
                np.asarray(Image.open(p.heatmap).convert("RGB")) if p.heatmap else None
                for p in drawn
            ]


class PacsError(PneumoscanError):
    """The PACS could not be reached, or refused a request, after every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for a PACS that is down or answers 5xx (or 429).

    Attributes:
        attempts: Tries in all, the first included.
        first_wait: Seconds before the second try; each later wait is ``factor`` times longer,
            up to ``max_wait``.
    """

    attempts: int = 5
    first_wait: float = 1.0
    factor: float = 2.0
    max_wait: float = 30.0

    def waits(self) -> Iterator[float]:
        """The waits between tries."""
        wait = self.first_wait
        for _ in range(self.attempts - 1):
            yield min(wait, self.max_wait)
            wait *= self.factor


def _retriable(exc: Exception) -> bool:
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return exc.response.status_code >= 500 or exc.response.status_code == 429
    return False


def _describe(exc: Exception) -> str:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    return f"{type(exc).__name__}: {exc}"


def with_retry(
    call: Callable[[], T],
    what: str,
    policy: RetryPolicy,
    report: Callable[[str], None] = lambda message: None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, retried with backoff while the PACS is down or answers 5xx.

    Raises:
        PacsError: Every try failed, or the PACS refused the request (4xx).
    """
    waits = policy.waits()
    while True:
        try:
            return call()
        except (requests.RequestException, OSError) as exc:
            wait = next(waits, None) if _retriable(exc) else None
            if wait is None:
                tries = policy.attempts if _retriable(exc) else 1
                raise PacsError(
                    f"{what} failed after {tries} tries: {_describe(exc)}; nothing was "
                    "written twice, and the next run continues where this one stopped"
                ) from exc
            report(f"{what}: {_describe(exc)}; retrying in {wait:.1f} s")
            sleep(wait)


class _TimeoutAdapter(HTTPAdapter):
    """Every request gets :data:`TIMEOUT` unless it sets its own."""

    def send(self, request: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = TIMEOUT
        return super().send(request, **kwargs)


def _read_credentials_file(path: Path) -> dict[str, str]:
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the credentials file ({exc})") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidInputError(
            f"{path}: the credentials file can be read by others (mode "
            f"{stat.S_IMODE(mode):o}); make it private with `chmod 600 {path}`"
        )
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(values, dict) or not (
        "token" in values or ("username" in values and "password" in values)
    ):
        raise InvalidInputError(
            f'{path}: give {{"token": "..."}} or {{"username": "...", "password": "..."}}'
        )
    return {str(key): str(value) for key, value in values.items()}


def pacs_session(
    credentials: str | Path | None = None, environ: dict[str, str] | None = None
) -> requests.Session:
    """An HTTP session for the PACS, with credentials from a file or the environment.

    A bearer token (``$PNEUMOSCAN_PACS_TOKEN`` or ``"token"`` in the file) wins over basic
    authentication (``$PNEUMOSCAN_PACS_USER`` and ``$PNEUMOSCAN_PACS_PASSWORD``, or
    ``"username"`` and ``"password"``). The file is ``credentials``, else
    ``$PNEUMOSCAN_PACS_CREDENTIALS``; it must not be readable by others.

    Raises:
        InvalidInputError: The file is unreadable, readable by others, or holds neither.
    """
    env = dict(os.environ if environ is None else environ)
    values: dict[str, str] = {}
    source = credentials or env.get(CREDENTIALS_ENV)
    if source:
        values = _read_credentials_file(Path(source))
    token = values.get("token") or env.get(TOKEN_ENV)
    user = values.get("username") or env.get(USER_ENV)
    password = values.get("password") or env.get(PASSWORD_ENV)
    session = requests.Session()
    # Pixel data gains little from gzip, and a PACS that compresses it on the fly spends more
    # than the transfer saves: 8 full-size studies from Orthanc took 12.0 s with it, 3.3 s
    # without (on a busy 2-core machine).
    session.headers["Accept-Encoding"] = "identity"
    adapter = _TimeoutAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user and password is not None:
        session.auth = (user, password)
    return session


def _values(item: dict[str, Any], tag: str) -> list[Any]:
    return list(item.get(tag, {}).get("Value", []))


def _first(item: dict[str, Any], tag: str) -> str:
    values = _values(item, tag)
    return str(values[0]) if values else ""


# DICOM JSON tags of the QIDO-RS answers read here.
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_MODALITY, _MODALITIES_IN_STUDY = "00080060", "00080061"


@dataclass
class StudyOutcome:
    """What one pass did to one study."""

    study_uid: str
    written: int = 0
    overlays: int = 0
    already_done: int = 0
    results: list[tuple[str, ImageResult]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class RunSummary:
    """What one pass did."""

    studies: list[StudyOutcome] = field(default_factory=list)

    @property
    def written(self) -> int:
        """SRs stored in this pass."""
        return sum(study.written for study in self.studies)

    def count(self, status: str) -> int:
        """Images of a status (``ok``, ``rejected``, ``error``) written in this pass."""
        return sum(r.status == status for s in self.studies for _, r in s.results)


class PacsRunner:
    """Scores a PACS's chest radiographs and stores the results back, pass by pass.

    Args:
        client: The DICOMweb client (its own retrying is turned off: :class:`RetryPolicy`
            retries here, and says so).
        predictor: The model, opened once (:meth:`Predictor.open`), as ``predict`` opens it.
        retry: Backoff for a PACS that is down or answers 5xx.
        report: Where progress and retry messages go (one line each).
        fhir_out: A JSON lines file to which each study's FHIR bundle is appended.
        ood_check: Run the cheap checks and the model's OOD detector, as ``predict`` does.
        overlays: Makes a picture per scored image (``None`` for none), stored beside the
            SRs as a Secondary Capture labelled not for diagnosis (:class:`GradcamOverlays`).
    """

    def __init__(
        self,
        client: DICOMwebClient,
        predictor: Predictor,
        *,
        retry: RetryPolicy | None = None,
        report: Callable[[str], None] = lambda message: None,
        fhir_out: Path | None = None,
        ood_check: bool = True,
        overlays: OverlayMaker | None = None,
    ) -> None:
        self.client = client
        client.set_http_retry_params(retry=False)
        self.predictor = predictor
        self.identity = ReportedModel.of(predictor)
        self.retry = retry or RetryPolicy()
        self.report = report
        self.fhir_out = fhir_out
        self.ood_check = ood_check
        self.overlays = overlays

    def _call(self, what: str, call: Callable[[], T]) -> T:
        return with_retry(call, what, self.retry, self.report)

    def image_studies(self, since: date | None = None) -> list[str]:
        """Study Instance UIDs of the studies with DX or CR images (QIDO-RS, one query per
        modality on ModalitiesInStudy, as every DICOMweb server must match it), in the order
        found."""
        found: dict[str, None] = {}
        for modality in MODALITIES:
            filters = {"ModalitiesInStudy": modality}
            if since is not None:
                filters["StudyDate"] = f"{since:%Y%m%d}-"
            studies = self._search_all(
                f"QIDO-RS search for {modality} studies",
                lambda offset, filters=filters: self.client.search_for_studies(  # type: ignore[misc]
                    fields=["ModalitiesInStudy"], search_filters=filters, offset=offset
                ),
                _STUDY_UID,
            )
            found.update(dict.fromkeys(_first(study, _STUDY_UID) for study in studies))
        return list(found)

    def _search_all(
        self, what: str, search: Callable[[int], list[dict[str, Any]]], key: str
    ) -> list[dict[str, Any]]:
        """Every page of a QIDO-RS search (a server may cap each answer). Paging stops at a
        page that adds nothing new: some servers ignore ``offset`` under some filters and
        would send the first page for ever."""
        found: dict[str, dict[str, Any]] = {}
        while True:
            page = self._call(what, lambda: search(len(found)))
            new = {_first(item, key): item for item in page if _first(item, key) not in found}
            if not new:
                return list(found.values())
            found.update(new)

    def _image_instances(self, study_uid: str) -> list[tuple[str, str]]:
        """``(series UID, SOP instance UID)`` of the study's DX and CR instances."""
        series = self._call(
            f"QIDO-RS search for series of study {study_uid}",
            lambda: self.client.search_for_series(study_uid, fields=["Modality"]),
        )
        instances: list[tuple[str, str]] = []
        for item in series:
            if _first(item, _MODALITY) not in MODALITIES:
                continue
            series_uid = _first(item, _SERIES_UID)
            found = self._search_all(
                f"QIDO-RS search for instances of series {series_uid}",
                lambda offset, uid=series_uid: self.client.search_for_instances(  # type: ignore[misc]
                    study_uid, uid, offset=offset
                ),
                _SOP_UID,
            )
            instances.extend((series_uid, _first(i, _SOP_UID)) for i in found)
        return instances

    def _stored_results(self, study_uid: str) -> set[str]:
        """SOP Instance UIDs in the study's pneumoscan results series for this model."""
        series_uid = results_series_uid(study_uid, self.identity.sha256)

        def search() -> list[dict[str, Any]]:
            try:
                return self.client.search_for_instances(study_uid, series_uid)
            except requests.HTTPError as exc:
                if exc.response is not None and exc.response.status_code == 404:
                    return []  # no results series yet
                raise

        found = self._call(f"QIDO-RS search for results of study {study_uid}", search)
        return {_first(item, _SOP_UID) for item in found}

    def pending(self, study_uid: str) -> tuple[list[tuple[str, str]], int]:
        """The study's image instances without an SR from this model, and how many have
        one."""
        stored = self._stored_results(study_uid)
        instances = self._image_instances(study_uid)
        todo = [
            (series, sop)
            for series, sop in instances
            if sr_instance_uid(sop, self.identity.sha256) not in stored
        ]
        return todo, len(instances) - len(todo)

    def _retrieve(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset | str:
        """The instance, or why it could not be read (then only its header is known)."""
        where = f"WADO-RS retrieve of instance {sop_uid}"
        try:
            return self._call(
                where,
                lambda: self.client.retrieve_instance(
                    study_uid, series_uid, sop_uid, media_types=ANY_TRANSFER_SYNTAX
                ),
            )
        except PacsError:
            raise
        except Exception as exc:  # the firewall: a damaged instance becomes a result
            return f"instance {sop_uid}: the PACS returned it, but it cannot be parsed ({exc})"

    def _header(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
        """The instance's attributes from WADO-RS metadata (for an instance that does not
        parse)."""
        found = self._call(
            f"WADO-RS metadata of instance {sop_uid}",
            lambda: self.client.retrieve_instance_metadata(study_uid, series_uid, sop_uid),
        )
        # Bulk data (the pixels) is left out: the header is all an SR needs.
        return Dataset.from_json({tag: v for tag, v in found.items() if "BulkDataURI" not in v})

    def score(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        """Results for retrieved instances, in order: refused by the selection rules, or
        decoded and scored as ``pneumoscan predict`` scores a file."""
        return self._score(datasets)[0]

    def _score(
        self, datasets: Sequence[Dataset]
    ) -> tuple[list[ImageResult], dict[int, tuple[DecodedImage, Prediction]]]:
        """:meth:`score`, and the decoded image and prediction of each position that went
        through the model (for overlays)."""
        results: list[ImageResult | None] = [None] * len(datasets)
        decoded: dict[int, DecodedImage] = {}
        for index, ds in enumerate(datasets):
            reason = refusal(ds)
            if reason is not None:
                results[index] = ImageResult.refused(reason)
                continue
            name = f"instance {ds.SOPInstanceUID}"
            preprocess = self.predictor.model.preprocess
            item = try_decode_image(_file_bytes(ds), preprocess, name=name)
            if isinstance(item, DecodedImage):
                decoded[index] = item
            else:
                results[index] = ImageResult.refused(item.message, "error")
        scored: dict[int, tuple[DecodedImage, Prediction]] = {}
        if decoded:
            names = [f"instance {datasets[i].SOPInstanceUID}" for i in decoded]
            predictions = self.predictor.predict_decoded(
                list(decoded.values()), names, ood_check=self.ood_check
            )
            for index, prediction in zip(decoded, predictions, strict=True):
                results[index] = ImageResult.from_prediction(prediction)
                scored[index] = (decoded[index], prediction)
        final = [r if r is not None else ImageResult.refused("not scored") for r in results]
        return final, scored

    def process_study(self, study_uid: str) -> StudyOutcome:
        """Score the study's instances that have no SR yet and store their SRs (one STOW-RS
        request for the study)."""
        started = time.perf_counter()
        todo, done = self.pending(study_uid)
        outcome = StudyOutcome(study_uid, already_done=done)
        if not todo:
            return outcome
        datasets: list[Dataset] = []
        failures: dict[int, str] = {}
        for series_uid, sop_uid in todo:
            retrieved = self._retrieve(study_uid, series_uid, sop_uid)
            if isinstance(retrieved, str):
                failures[len(datasets)] = retrieved
                retrieved = self._header(study_uid, series_uid, sop_uid)
            datasets.append(retrieved)
        readable = [i for i in range(len(datasets)) if i not in failures]
        scored, decoded = self._score([datasets[i] for i in readable])
        by_position = dict(zip(readable, scored, strict=True))
        results = [
            by_position[i] if i in by_position else ImageResult.refused(failures[i], "error")
            for i in range(len(datasets))
        ]
        reports: list[Dataset] = [
            build_sr(result, ds, self.identity, instance_number=done + i + 1)
            for i, (result, ds) in enumerate(zip(results, datasets, strict=True))
        ]
        if self.overlays is not None and decoded:
            positions = [readable[j] for j in decoded]
            pairs = list(decoded.values())
            pictures = self.overlays([d for d, _ in pairs], [p for _, p in pairs])
            for i, picture in zip(positions, pictures, strict=True):
                if picture is not None:
                    number = done + len(reports) + 1
                    reports.append(
                        build_overlay_sc(
                            picture, datasets[i], self.identity, instance_number=number
                        )
                    )
                    outcome.overlays += 1
        self._store(study_uid, reports)
        if self.fhir_out is not None:
            bundle = study_bundle(list(zip(results, datasets, strict=True)), self.identity)
            with self.fhir_out.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(bundle) + "\n")
        outcome.written = len(reports) - outcome.overlays
        outcome.results = [
            (str(ds.SOPInstanceUID), result) for ds, result in zip(datasets, results, strict=True)
        ]
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _store(self, study_uid: str, reports: Sequence[Dataset]) -> None:
        answer = self._call(
            f"STOW-RS store of {len(reports)} instance(s) in study {study_uid}",
            lambda: self.client.store_instances(list(reports), study_uid),
        )
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        if failed:
            reasons = ", ".join(str(item.get("FailureReason", "?")) for item in failed)
            raise PacsError(
                f"STOW-RS: the PACS refused {len(failed)} instance(s) of study {study_uid} "
                f"(failure reasons {reasons})"
            )

    def run_once(self, since: date | None = None) -> RunSummary:
        """One pass over the PACS: every study with images lacking a result gets them."""
        summary = RunSummary()
        for study_uid in self.image_studies(since):
            outcome = self.process_study(study_uid)
            summary.studies.append(outcome)
            if outcome.written:
                counts = {s: sum(r.status == s for _, r in outcome.results) for s in _STATUSES}
                self.report(
                    f"study {study_uid}: {outcome.written} SR(s) stored ({counts['ok']} scored, "
                    f"{counts['rejected']} refused, {counts['error']} unreadable)"
                    + (f" and {outcome.overlays} overlay(s)" if outcome.overlays else "")
                    + f" in {outcome.seconds:.2f} s"
                )
        return summary


_STATUSES = ("ok", "rejected", "error")


def _file_bytes(ds: Dataset) -> bytes:
    """The instance as the bytes of a DICOM file (as ``predict`` would read it from disk)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def connect(url: str, credentials: str | Path | None = None) -> DICOMwebClient:
    """A DICOMweb client for the PACS at ``url`` (QIDO, WADO and STOW under it)."""
    if not url.startswith(("http://", "https://")):
        raise InvalidInputError(f"{url}: give the DICOMweb root as an http:// or https:// URL")
    return DICOMwebClient(url=url.rstrip("/"), session=pacs_session(credentials))
