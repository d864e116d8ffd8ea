"""`pneumoscan pacs`: score a PACS's chest radiographs over DICOMweb and store DICOM SRs back."""

from __future__ import annotations

import time
from datetime import date, datetime
from pathlib import Path
from typing import Annotated

import typer

from pneumoscan.cli.common import ScoringModelOption, _fail, stderr, stdout


def _since(value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d").date()
    except ValueError:
        _fail(f"--since {value!r}: give a date as YYYY-MM-DD")


def pacs(
    url: Annotated[
        str,
        typer.Option(help="The PACS's DICOMweb root, e.g. http://localhost:8042/dicom-web."),
    ],
    once: Annotated[
        bool, typer.Option("--once", help="One pass, then exit (the default).")
    ] = False,
    poll: Annotated[
        float | None,
        typer.Option(help="Pass after pass, SECONDS apart, until interrupted (Ctrl-C)."),
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only studies from this date on (YYYY-MM-DD).")
    ] = None,
    model: ScoringModelOption = None,
    backend: Annotated[
        str, typer.Option(help="auto (the saved ONNX export if any), keras or onnx.")
    ] = "auto",
    credentials: Annotated[
        Path | None,
        typer.Option(
            help='JSON file with {"token": ...} or {"username": ..., "password": ...} '
            "(mode 600); default: $PNEUMOSCAN_PACS_CREDENTIALS, else $PNEUMOSCAN_PACS_TOKEN, "
            "else $PNEUMOSCAN_PACS_USER and $PNEUMOSCAN_PACS_PASSWORD."
        ),
    ] = None,
    fhir: Annotated[
        Path | None,
        typer.Option(help="Also append each study's FHIR R4 bundle to this .ndjson file."),
    ] = None,
    heatmaps: Annotated[
        bool,
        typer.Option(
            help="Also store a Grad-CAM overlay per scored image (Secondary Capture, labelled "
            "NOT FOR DIAGNOSIS); needs the Keras model and loads TensorFlow."
        ),
    ] = False,
    retries: Annotated[
        int, typer.Option(help="Tries per request while the PACS is down or answers 5xx.")
    ] = 5,
) -> None:
    """Score the PACS's DX/CR studies that have no pneumoscan result yet; store a DICOM SR
    per image back into its study (idempotent: a second pass writes nothing)."""
    try:
        # lazy: loads highdicom, dicomweb-client and fhir.resources (the pacs extra)
        from pneumoscan.interop.pacs import (
            GradcamOverlays,
            PacsError,
            PacsRunner,
            RetryPolicy,
            connect,
        )
    except ImportError as exc:
        _fail(f"{exc}; install the PACS support with `pip install 'pneumoscan[pacs]'`")
    from pneumoscan.inference.predictor import Predictor  # lazy: loads SciPy

    if once and poll is not None:
        _fail("give --once or --poll SECONDS, not both")
    if poll is not None and poll <= 0:
        _fail("--poll needs a positive number of seconds")
    if retries < 1:
        _fail("--retries needs at least 1")
    start_date = _since(since)
    client = connect(url, credentials)
    predictor = Predictor.open(model, backend)
    if predictor.note:
        stderr.print(predictor.note, highlight=False)
    if heatmaps and not predictor.has_network:
        _fail(
            f"--heatmaps needs the Keras model {predictor.name} was exported from: put "
            "MODEL.keras beside it, or give --model MODEL.keras"
        )
    runner = PacsRunner(
        client,
        predictor,
        retry=RetryPolicy(attempts=retries),
        report=lambda line: stderr.print(line, highlight=False, soft_wrap=True),
        fhir_out=fhir,
        overlays=GradcamOverlays(predictor) if heatmaps else None,
    )
    while True:
        started = time.perf_counter()
        try:
            summary = runner.run_once(start_date)
        except PacsError as exc:
            if poll is None:
                _fail(str(exc), code=1)
            stderr.print(
                f"[red]error:[/red] {exc}; next pass in {poll:g} s", highlight=False, soft_wrap=True
            )
        else:
            seconds = time.perf_counter() - started
            stdout.print(
                f"{len(summary.studies)} studies with radiographs; {summary.written} SRs "
                f"stored ({summary.count('ok')} scored, {summary.count('rejected')} refused, "
                f"{summary.count('error')} unreadable) in {seconds:.1f} s "
                f"({predictor.name}, {predictor.backend})",
                highlight=False,
                soft_wrap=True,
            )
        if poll is None:
            return
        try:
            time.sleep(poll)
        except KeyboardInterrupt:
            stderr.print("stopped polling", highlight=False)
            return
