"""The PACS round trip against a real Orthanc: `pneumoscan pacs --once` scores every
radiograph, stores a valid SR per image back, writes nothing twice, resumes, and refuses what
it cannot read."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from fhir.resources.R4B.bundle import Bundle
from pacs_server import (
    DCIODVFY,
    DSRDUMP,
    PASSWORD,
    USER,
    free_port,
    lossy_proxy,
    needs_dicom_tools,
    needs_orthanc,
    orthanc_server,
)
from studies import Instance, make_studies
from typer.testing import CliRunner

import pneumoscan
from pneumoscan.cli import app
from pneumoscan.inference.predictor import Predictor
from pneumoscan.interop.pacs import PASSWORD_ENV, USER_ENV, PacsRunner, pacs_session
from pneumoscan.interop.sr import PNEUMONIA, read_sr

pytestmark = needs_orthanc
runner = CliRunner()
ENV = {USER_ENV: USER, PASSWORD_ENV: PASSWORD}


@dataclass
class Pacs:
    """The running test PACS and what was uploaded to it."""

    base: str
    instances: list[Instance]
    client: DICOMwebClient

    @property
    def url(self) -> str:
        return f"{self.base}/dicom-web"

    def count(self) -> int:
        """Instances stored in the PACS."""
        answer = requests.get(f"{self.base}/statistics", auth=(USER, PASSWORD), timeout=10)
        return int(answer.json()["CountInstances"])

    def results(self, *studies: str) -> dict[str, pydicom.Dataset]:
        """Every SR in the PACS (in the uploaded studies, or ``studies``), by the SOP Instance
        UID of the image it reports on."""
        found: dict[str, pydicom.Dataset] = {}
        for study in studies or sorted({i.study_uid for i in self.instances}):
            for item in self.client.search_for_instances(study, search_filters={"Modality": "SR"}):
                series = item["0020000E"]["Value"][0]
                sop = item["00080018"]["Value"][0]
                sr = self.client.retrieve_instance(study, series, sop)
                report = hd.sr.ComprehensiveSR.from_dataset(sr, copy=True)
                groups = report.content.get_image_measurement_groups(finding_type=PNEUMONIA)
                source = groups[0].source_images[0].referenced_sop_instance_uid
                found[str(source)] = sr
        return found


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pacs]:
    """Orthanc holding the test studies, uploaded through STOW-RS."""
    folder = tmp_path_factory.mktemp("orthanc")
    instances = make_studies(folder / "upload")
    with orthanc_server(folder / "server") as base:
        session = pacs_session(environ=ENV)
        client = DICOMwebClient(url=f"{base}/dicom-web", session=session)
        client.store_instances([pydicom.dcmread(i.path) for i in instances])
        yield Pacs(base, instances, client)


@dataclass
class Run:
    output: str
    exit_code: int
    seconds: float
    fhir: Path


def run_pacs(pacs: Pacs, *options: str, fhir: Path | None = None) -> Run:
    fhir = fhir or Path("/dev/null")
    started = time.perf_counter()
    result = runner.invoke(app, ["pacs", "--url", pacs.url, *options, "--fhir", str(fhir)], env=ENV)
    return Run(result.output, result.exit_code, time.perf_counter() - started, fhir)


@pytest.fixture(scope="module")
def first_run(pacs: Pacs, tmp_path_factory: pytest.TempPathFactory) -> Run:
    fhir = tmp_path_factory.mktemp("fhir") / "results.ndjson"
    run = run_pacs(pacs, "--once", fhir=fhir)
    assert run.exit_code == 0, run.output
    return run


def test_every_image_gets_an_sr_that_references_it(pacs: Pacs, first_run: Run) -> None:
    assert "4 studies with radiographs; 5 SRs stored (3 scored, 1 refused, 1 unreadable)" in (
        first_run.output
    )
    results = pacs.results()
    assert set(results) == {i.sop_uid for i in pacs.instances}
    for instance in pacs.instances:
        sr, source = results[instance.sop_uid], pydicom.dcmread(instance.path)
        assert sr.StudyInstanceUID == source.StudyInstanceUID  # stored in the same study
        assert sr.PatientID == source.PatientID
        assert sr.AccessionNumber == source.AccessionNumber
        assert sr.VerificationFlag == "UNVERIFIED"
        assert read_sr(sr).status == instance.expect


def test_probability_is_the_one_predict_gives_for_the_file(pacs: Pacs, first_run: Run) -> None:
    results = pacs.results()
    scored = [i for i in pacs.instances if i.expect == "ok"]
    table = pneumoscan.load().predict([str(i.path) for i in scored])
    assert list(table["status"]) == ["ok"] * len(scored)
    for instance, expected in zip(scored, table["probability"], strict=True):
        result = read_sr(results[instance.sop_uid])
        assert result.probability == pytest.approx(float(expected), abs=1e-6)
        assert result.decision in ("NORMAL", "PNEUMONIA")
        assert result.threshold == pytest.approx(pneumoscan.load().threshold)


def test_corrupt_and_hand_images_get_a_reason_and_no_probability(
    pacs: Pacs, first_run: Run
) -> None:
    results = pacs.results()
    refused = {i.expect: read_sr(results[i.sop_uid]) for i in pacs.instances if i.expect != "ok"}
    assert refused["error"].probability is None
    assert "Pixel Data" in (refused["error"].reason or "")
    assert refused["rejected"].probability is None
    assert "BodyPartExamined is HAND" in (refused["rejected"].reason or "")


@needs_dicom_tools
def test_dsrdump_renders_and_dciodvfy_finds_no_error(
    pacs: Pacs, first_run: Run, tmp_path: Path
) -> None:
    assert DSRDUMP is not None and DCIODVFY is not None
    for sop, sr in pacs.results().items():
        path = tmp_path / f"{sop}.dcm"
        sr.save_as(path, enforce_file_format=True)
        dump = subprocess.run([DSRDUMP, "+Pl", str(path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert "Comprehensive SR Document" in dump.stdout
        assert ("Probability of pneumonia" in dump.stdout) != ("Not scored:" in dump.stdout)
        check = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True)
        errors = [line for line in check.stderr.splitlines() if line.startswith("Error")]
        assert not errors, "\n".join(errors)


def test_fhir_bundles_validate_and_match_the_srs(pacs: Pacs, first_run: Run) -> None:
    lines = first_run.fhir.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4  # one bundle per study
    results = pacs.results()
    observed = 0
    for line in lines:
        bundle = Bundle.model_validate(json.loads(line))
        for entry in bundle.entry or []:
            resource = entry.resource
            if resource.get_resource_type() != "Observation":
                continue
            observed += 1
            sop = resource.identifier[0].value.removeprefix("urn:oid:")
            expected = read_sr(results[sop])
            if expected.probability is None:
                assert resource.valueQuantity is None and resource.dataAbsentReason is not None
            else:
                assert float(resource.valueQuantity.value) == pytest.approx(expected.probability)
    assert observed == len(pacs.instances)


def test_second_run_writes_nothing(pacs: Pacs, first_run: Run) -> None:
    before = pacs.count()
    again = run_pacs(pacs, "--once")
    assert again.exit_code == 0, again.output
    assert "0 SRs stored" in again.output
    assert pacs.count() == before


def test_a_run_resumes_what_is_missing(pacs: Pacs, first_run: Run) -> None:
    hand = next(i for i in pacs.instances if i.expect == "rejected")
    sr = pacs.results()[hand.sop_uid]
    auth = (USER, PASSWORD)
    found = requests.post(f"{pacs.base}/tools/lookup", data=sr.SOPInstanceUID, auth=auth)
    requests.delete(f"{pacs.base}/instances/{found.json()[0]['ID']}", auth=auth).raise_for_status()
    before = pacs.count()
    again = run_pacs(pacs, "--once")
    assert "1 SRs stored (0 scored, 1 refused, 0 unreadable)" in again.output, again.output
    assert pacs.count() == before + 1
    assert pacs.results()[hand.sop_uid].SOPInstanceUID == sr.SOPInstanceUID  # the same SR


def test_since_skips_older_studies(pacs: Pacs, first_run: Run) -> None:
    later = run_pacs(pacs, "--once", "--since", "2030-01-01")
    assert later.exit_code == 0, later.output
    assert "0 studies with radiographs" in later.output


def test_wrong_credentials_are_refused_once_not_retried(pacs: Pacs) -> None:
    result = runner.invoke(
        app, ["pacs", "--url", pacs.url, "--once"], env={USER_ENV: USER, PASSWORD_ENV: "wrong"}
    )
    assert result.exit_code == 1
    assert "HTTP 401" in result.output and "after 1 tries" in result.output
    assert "retrying" not in result.output


def test_a_pacs_that_is_down_is_retried_then_reported() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    result = runner.invoke(app, ["pacs", "--url", url, "--once", "--retries", "2"], env=ENV)
    assert result.exit_code == 1
    assert "retrying in 1.0 s" in result.output
    assert re.search(r"failed after 2 tries: ConnectionError", result.output), result.output


def test_poll_passes_until_interrupted(
    pacs: Pacs, first_run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(seconds: float) -> None:
        assert seconds == 30
        raise KeyboardInterrupt

    monkeypatch.setattr("pneumoscan.cli.interop.time.sleep", interrupt)
    polled = run_pacs(pacs, "--poll", "30")
    assert polled.exit_code == 0, polled.output
    assert "0 SRs stored" in polled.output and "stopped polling" in polled.output


def test_heatmaps_are_stored_as_overlays_not_for_diagnosis(
    pacs: Pacs, first_run: Run, tmp_path: Path
) -> None:
    """Runs last: it adds a study, scored with --heatmaps (Grad-CAM loads TensorFlow)."""
    new = [i for i in make_studies(tmp_path / "new") if i.path.name == "dx-m2.dcm"]
    pacs.client.store_instances([pydicom.dcmread(i.path) for i in new])
    run = run_pacs(pacs, "--once", "--heatmaps")
    assert run.exit_code == 0, run.output
    assert "1 SR(s) stored (1 scored, 0 refused, 0 unreadable) and 1 overlay(s)" in run.output
    found = pacs.client.search_for_instances(new[0].study_uid, search_filters={"Modality": "OT"})
    assert len(found) == 1
    series, sop = found[0]["0020000E"]["Value"][0], found[0]["00080018"]["Value"][0]
    overlay = pacs.client.retrieve_instance(new[0].study_uid, series, sop)
    assert overlay.BurnedInAnnotation == "YES"
    assert overlay.ImageComments.startswith("NOT FOR DIAGNOSIS")
    assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == new[0].sop_uid
    assert overlay.pixel_array.ndim == 3
    again = run_pacs(pacs, "--once", "--heatmaps")
    assert "0 SRs stored" in again.output


def test_a_lost_answer_is_retried_and_nothing_is_stored_twice(
    pacs: Pacs, first_run: Run, tmp_path: Path
) -> None:
    new = [i for i in make_studies(tmp_path / "new") if i.path.name == "dx-chest.dcm"]
    pacs.client.store_instances([pydicom.dcmread(i.path) for i in new])
    before = pacs.count()
    with lossy_proxy(pacs.base, lose=1) as (proxy, posts):
        url = f"{proxy}/dicom-web"
        result = runner.invoke(app, ["pacs", "--url", url, "--once", "--retries", "3"], env=ENV)
    assert result.exit_code == 0, result.output
    assert "HTTP 503" in result.output and "retrying in 1.0 s" in result.output
    assert posts == [2]  # the STOW-RS request, sent twice
    assert "1 SRs stored (1 scored" in result.output
    assert pacs.count() == before + 1  # stored once


def test_an_instance_that_does_not_parse_gets_an_sr_from_its_metadata(
    pacs: Pacs, first_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = next(i for i in make_studies(tmp_path / "new") if i.path.name == "dx-m2.dcm")
    pacs.client.store_instances([pydicom.dcmread(new.path)])
    client = DICOMwebClient(url=pacs.url, session=pacs_session(environ=ENV))
    retrieve = client.retrieve_instance

    def broken(study: str, series: str, sop: str, **options: object) -> pydicom.Dataset:
        if sop == new.sop_uid:
            raise ValueError("multipart message ends early")
        return retrieve(study, series, sop, **options)

    monkeypatch.setattr(client, "retrieve_instance", broken)
    outcome = PacsRunner(client, Predictor.open()).process_study(new.study_uid)
    assert outcome.written == 1
    stored = read_sr(pacs.results(new.study_uid)[new.sop_uid])
    assert stored.status == "error" and stored.probability is None
    assert "cannot be parsed (multipart message ends early)" in (stored.reason or "")
