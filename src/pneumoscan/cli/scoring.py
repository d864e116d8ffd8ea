"""`pneumoscan predict`, `export`, `models`, `serve` and `info`: using a model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from pneumoscan.cli.common import (
    ModelOption,
    ScoringModelOption,
    _fail,
    stderr,
    stdout,
)
from pneumoscan.cli.scaling import check_engine, predict_on_ray
from pneumoscan.constants import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_SEED,
    SAMPLES_DIR,
)
from pneumoscan.errors import InvalidInputError
from pneumoscan.formatting import format_probability, format_threshold
from pneumoscan.progress import Reporter


def predict(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Image files or folders (recursive).")
    ] = None,
    model: ScoringModelOption = None,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Also write every result to this .json file at the end."),
    ] = None,
    samples: Annotated[
        bool, typer.Option(help="Also predict the sample X-rays shipped with pneumoscan.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images scored at a time.")] = 32,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Results file: .csv or .jsonl (streamed as results come), .json or .parquet "
            "(written at the end).",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue --out (.csv or .jsonl), skipping files already ok or rejected there."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace existing --out, --json and --fhir files.")
    ] = False,
    fhir: Annotated[
        Path | None,
        typer.Option(
            "--fhir",
            help="Also write a FHIR R4 Bundle per study of the DICOM inputs (DiagnosticReport, "
            "Observations, the model's Device, the ImagingStudy) to this .ndjson file at the "
            "end (the pacs extra).",
        ),
    ] = None,
    anonymise: Annotated[
        bool,
        typer.Option(
            "--anonymise",
            help="Leave DICOM identifiers (study, series and SOP instance UIDs, accession "
            "number, patient id) out of the results.",
        ),
    ] = False,
    heatmaps: Annotated[
        Path | None,
        typer.Option(
            help="Folder for a Grad-CAM overlay PNG per accepted image (drawn with the Keras "
            "network; scores stay those of the scoring backend)."
        ),
    ] = None,
    ood_check: Annotated[
        bool,
        typer.Option(
            "--ood-check/--no-ood-check",
            help="Reject inputs that do not look like frontal chest X-rays.",
        ),
    ] = True,
    backend: Annotated[
        str,
        typer.Option(
            help="auto: the model's saved ONNX export if any (the shipped model has an int8 "
            "one), else keras; keras; or onnx (ONNX Runtime)."
        ),
    ] = "auto",
    onnx: Annotated[
        Path | None,
        typer.Option(help="ONNX file for --backend onnx (default: exported from the model)."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Decoding threads.")] = 2,
    sort: Annotated[
        str,
        typer.Option(
            help="Order of the printed table: probability (likely pneumonia first, then "
            "rejected and unreadable files), path, or input (as given). --out and --json "
            "keep input order."
        ),
    ] = "probability",
    engine: Annotated[
        str,
        typer.Option(
            help="local (this process), or ray: Ray Data on a Ray cluster (the ray extra; "
            "needs --out; a .parquet or .csv source with a 'path' column is a manifest)."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="--engine ray: the cluster to join (auto, HOST:6379, ray://HOST:10001; "
            "default: RAY_ADDRESS, else a new local one)."
        ),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option(help="--engine ray: scoring actors (default: one per cluster CPU)."),
    ] = None,
) -> None:
    """P(pneumonia) and a decision per file; non-X-rays are rejected, bad files listed."""
    from pneumoscan.inference import writers  # lazy: loads SciPy
    from pneumoscan.inference.predict import Problem, check_batching, list_inputs  # lazy: SciPy
    from pneumoscan.inference.prediction import printable_path  # lazy: loads SciPy
    from pneumoscan.inference.predictor import Predictor  # lazy: loads SciPy

    if sort not in TABLE_SORTS:
        _fail(f"unknown --sort {sort!r}; choose one of {', '.join(TABLE_SORTS)}")
    inputs = [*(paths or []), *(sorted(SAMPLES_DIR.glob("*/*.jpeg")) if samples else [])]
    if not inputs:
        _fail("give image files or folders, or --samples")
    if resume and out is None:
        _fail("--resume needs --out FILE (the results file to continue)")
    check_batching(batch_size, workers)
    check_engine(engine, out, json_out, heatmaps)
    if engine != "local" and (fhir is not None or anonymise):
        _fail("--fhir and --anonymise work with --engine local")
    if fhir is not None:
        if anonymise:
            _fail("--fhir with --anonymise: a FHIR report names its patient and study")
        from pneumoscan.interop.writers import check_fhir_output  # lazy: the pacs extra

        check_fhir_output(fhir, overwrite=overwrite)
    if engine == "ray" and out is not None:
        predict_on_ray(
            inputs, out, model=model, backend=backend, onnx=onnx, address=address,
            actors=actors, batch_size=batch_size, ood_check=ood_check, workers=workers,
            resume=resume, overwrite=overwrite,
        )  # fmt: skip
        return
    targets = [(out, writers.WRITERS, resume), (json_out, (".json",), False)]
    for target, allowed, resuming in targets:
        if target is not None:
            writers.check_output(target, overwrite=overwrite, resuming=resuming, allowed=allowed)
    entries = list_inputs(inputs)
    names = [printable_path(e.path if isinstance(e, Problem) else e) for e in entries]
    plan = writers.ResumePlan(set(), [])
    if resume and out is not None:
        plan = writers.plan_resume(out, names)
        skipped = sum(name in plan.done for name in names)
        stderr.print(f"resuming {out}: {skipped} files already done", highlight=False)
        entries = [e for e, name in zip(entries, names, strict=True) if name not in plan.done]
    predictor = Predictor.open(model, backend, onnx)
    if predictor.note:
        stderr.print(predictor.note, highlight=False)
    if ood_check and predictor.detector is None:
        stderr.print(
            f"{predictor.name} has no fitted OOD detector: only the cheap checks run "
            "(add one with `pneumoscan fit-ood`)",
            highlight=False,
        )
    if heatmaps is not None:
        predictor.network  # noqa: B018  # load it now: a missing Keras file is one error line
    about = {"model": str(predictor.model.path), "model_info": predictor.describe()}
    opened = [
        writers.open_writer(target, kept=plan.kept, overwrite=overwrite, resuming=resuming,
                            about=about, allowed=allowed)
        for target, allowed, resuming in targets
        if target is not None
    ]  # fmt: skip
    if fhir is not None:
        from pneumoscan.interop.records import ReportedModel  # lazy: the pacs extra
        from pneumoscan.interop.writers import open_fhir_writer  # lazy: the pacs extra

        opened.append(open_fhir_writer(fhir, ReportedModel.of(predictor), overwrite=overwrite))
    stream = predictor.predict_entries(
        entries, batch_size, ood_check=ood_check, heatmaps=heatmaps, workers=workers
    )
    started = time.perf_counter()
    results: list[Any] = []
    failure: Exception | None = None
    try:
        with Reporter(stderr).task("predicting", total=len(entries)) as advance:
            for result in stream:
                if anonymise:
                    result = result.anonymised()
                results.append(result)
                for writer in opened:
                    writer.write(result)
                advance(1)
    except Exception as exc:  # only the model can fail here: keep what was done, say so
        failure = exc
    finally:
        for writer in opened:
            writer.close(complete=failure is None)
    not_dicom = [name for writer in opened for name in getattr(writer, "skipped", [])]
    if fhir is not None and not_dicom:
        stderr.print(
            f"{len(not_dicom)} inputs are not DICOM files with a study: not in {fhir}",
            highlight=False,
        )
    if failure is not None:
        _stop_after_model_failure(failure, results, json_out, out, len(entries))
    title = f"pneumoscan {predictor.name} (threshold {format_threshold(predictor.threshold)})"
    _print_predictions(results, title, predictor.threshold, sort)
    seconds = time.perf_counter() - started
    counts = summarise(results)
    done = len(plan.done & set(names))
    stdout.print(
        f"{counts['ok']} ok, {counts['rejected']} rejected (not a frontal chest X-ray), "
        f"{counts['error']} unreadable; {len(results)} inputs in {seconds:.1f} s "
        f"({len(results) / max(seconds, 1e-9):.1f} images/s, {predictor.name}, "
        f"{predictor.backend})"
        + (f"; {done} done before" if resume else "")
        + (f"; results in {out}" if out else ""),
        highlight=False,
    )
    if results and counts["ok"] + counts["rejected"] + done == 0:
        _fail("no input could be read", code=1)


def summarise(results: list[Any]) -> dict[str, int]:
    """Count of predictions per status."""
    from pneumoscan.inference.prediction import summarise as count  # lazy: loads SciPy

    return count(results)


def _stop_after_model_failure(
    failure: Exception,
    results: list[Any],
    json_out: Path | None,
    out: Path | None,
    total: int,
) -> None:
    """End a run whose model failed, keeping every result written so far (files never end a
    run: their failures are results)."""
    kept = f"; the {len(results)} results so far are in {out}" if out else ""
    partial = f" ({json_out} is marked incomplete)" if json_out else ""
    resume = f" (continue with --resume --out {out})" if out else ""
    _fail(
        f"the model failed after {len(results)} of {total} inputs: "
        f"{type(failure).__name__}: {failure}{kept}{partial}{resume}",
        code=1,
    )


MAX_TABLE_ROWS = 200


TABLE_SORTS = ("probability", "path", "input")


def sort_results(results: list[Any], order: str) -> list[Any]:
    """Predictions in a table order: ``probability`` (scored files by falling P(pneumonia),
    then rejected, then unreadable files, each in input order), ``path`` or ``input``."""
    if order == "input":
        return list(results)
    if order == "path":
        return sorted(results, key=lambda r: str(r.path))
    if order != "probability":
        raise InvalidInputError(f"unknown order {order!r}; choose one of {TABLE_SORTS}")
    rank = {"ok": 0, "rejected": 1}
    return sorted(
        results,
        key=lambda r: (rank.get(r.status, 2), -float(r.probability or 0.0)),
    )


def display_names(paths: list[str]) -> dict[str, str]:
    """A short name per path: the file name, with parent folders added only where two
    shown files share a name (``NORMAL/1.jpeg`` and ``PNEUMONIA/1.jpeg``)."""
    parts = {path: Path(path).parts or (path,) for path in set(paths)}
    depth = dict.fromkeys(parts, 1)
    while True:
        shown: dict[str, list[str]] = {}
        for path, pieces in parts.items():
            shown.setdefault("/".join(pieces[-depth[path] :]), []).append(path)
        clashes = [
            path
            for group in shown.values()
            if len(group) > 1
            for path in group
            if depth[path] < len(parts[path])
        ]
        if not clashes:
            return {path: "/".join(parts[path][-depth[path] :]) for path in parts}
        for path in clashes:
            depth[path] += 1


def _print_predictions(
    results: list[Any],
    title: str,
    threshold: float | None = None,
    order: str = "probability",
) -> None:
    from pneumoscan.inference.prediction import NEAR_THRESHOLD_TEXT, printable_path  # lazy: SciPy
    from pneumoscan.models.subtype import SUBTYPE_LABEL  # lazy: SciPy

    if len(results) > MAX_TABLE_ROWS:
        stderr.print(
            f"{len(results)} results: the table is printed for up to {MAX_TABLE_ROWS}; every "
            "result is in --out FILE (.csv, .jsonl, .json, .parquet) or --json FILE",
            highlight=False,
        )
        return
    shown = {r.path: printable_path(r.path) for r in results}
    names = display_names(list(shown.values()))
    table = Table(title=title)
    table.add_column("file", overflow="fold")
    for column in ("status", "P(pneumonia)", "decision / reason"):
        table.add_column(column)
    for result in sort_results(results, order):
        name = Text(names[shown[result.path]])  # a file name is never Rich markup
        if result.status == "ok":
            probability = format_probability(result.probability, threshold)
            near = f" ({NEAR_THRESHOLD_TEXT})" if result.near_threshold else ""
            decision = f"{result.decision}{near}"
            if result.subtype_estimate is not None and result.p_viral is not None:
                decision += f"; {result.subtype_estimate}* (P(viral) {result.p_viral:.2f})"
            table.add_row(name, "ok", probability, Text(decision))
        elif result.status == "rejected":
            table.add_row(name, "[yellow]rejected[/yellow]", "", Text(str(result.reason)))
        else:
            table.add_row(name, "[red]error[/red]", "", Text(printable_path(str(result.error))))
    stdout.print(table)
    if any(result.subtype_estimate for result in results):
        stdout.print(f"* bacterial or viral: {SUBTYPE_LABEL}", highlight=False)


def export_model(
    model: ModelOption = None,
    export_format: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    out: Annotated[
        Path | None,
        typer.Option(
            help="File to write (default: beside the model, MODEL.onnx or MODEL.int8.onnx, "
            "where `predict --backend auto` finds it; the shipped model's: this folder)."
        ),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = 17,
    quantize: Annotated[
        str | None,
        typer.Option(help="int8: static int8 quantisation (about 1.9x the float32 speed)."),
    ] = None,
    calibration_data: Annotated[
        Path | None,
        typer.Option(help="Dataset with the model's training images, for --quantize int8."),
    ] = None,
    calibration_images: Annotated[
        int, typer.Option(help="Training images that calibrate the int8 ranges.")
    ] = DEFAULT_CALIBRATION_IMAGES,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = DEFAULT_SEED,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace an existing --out file (the default export beside "
            "the model is always refreshed)."
        ),
    ] = False,
) -> None:
    """Export a model (with its metadata and OOD detector) to ONNX for ONNX Runtime."""
    from pneumoscan.inference.export import (  # lazy: loads SciPy
        FORMATS,
        default_export_path,
        export_onnx,
    )

    # lazy: the CLI loads only what a command runs
    from pneumoscan.models.modelfile import resolve_model_path

    if export_format not in FORMATS:
        _fail(f"unknown format {export_format!r}; choose one of {FORMATS}")
    source = resolve_model_path(model)
    target = out or default_export_path(source, quantize)
    summary = export_onnx(
        source, target, opset=opset, quantize=quantize,
        calibration_data=calibration_data, calibration_images=calibration_images, seed=seed,
        overwrite=overwrite or out is None,
    )  # fmt: skip
    detector = "included" if summary.ood else "none (run fit-ood first to include one)"
    if summary.quantization:
        used = summary.quantization["calibration_images"]
        stdout.print(f"int8, calibrated on {used} training images of {calibration_data}")
    stdout.print(
        f"wrote {summary.path} ({summary.size_bytes / 1e6:.1f} MB; outputs "
        f"{', '.join(summary.outputs)}; OOD detector {detector})",
        highlight=False,
    )


def models() -> None:
    """List the registered architectures."""
    # lazy: the CLI loads only what a command runs
    from pneumoscan.models import get_spec, list_models

    table = Table(title="Registered architectures")
    for column in ("name", "input", "recipe", "description"):
        table.add_column(column)
    for name in list_models():
        spec = get_spec(name)
        recipe = spec.recipe
        table.add_row(
            name,
            "x".join(map(str, spec.preprocess.image_size)),
            f"{recipe.optimizer}, batch {recipe.batch_size}, {recipe.epochs} epochs",
            spec.description,
        )
    stdout.print(table)


def serve(
    model: ScoringModelOption = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="PNEUMOSCAN_API_KEY",
            show_envvar=True,
            help="Require this key in the X-API-Key header on /v1/* (prefer the environment "
            "variable: a command line is visible to other users of the machine).",
        ),
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest accepted file in MB; larger ones get HTTP 413.")
    ] = 20.0,
    max_request_mb: Annotated[
        float, typer.Option(help="Largest accepted request (all files together) in MB.")
    ] = 100.0,
    max_files: Annotated[int, typer.Option(help="Most files in one request.")] = 50,
    backend: Annotated[
        str,
        typer.Option(
            help="auto: the model's saved ONNX export if any, as predict uses (Keras loads for "
            "heatmaps only); keras; or onnx (ONNX Runtime)."
        ),
    ] = "auto",
) -> None:
    """Serve the triage web page and the JSON API (FastAPI on uvicorn); Ctrl-C stops it."""
    import logging  # lazy: the CLI loads only what a command runs

    import uvicorn  # lazy: loads uvicorn

    # lazy: the CLI loads only what a command runs
    from pneumoscan.models.modelfile import resolve_model_path
    from pneumoscan.serve.app import create_app  # lazy: loads FastAPI
    from pneumoscan.serve.uploads import MB  # lazy: the CLI loads only what a command runs

    if backend not in ("auto", "keras", "onnx"):
        _fail(f"unknown backend {backend!r}; choose auto, keras or onnx")
    # A wrong model path is a typo: say so now rather than from a running server's /health.
    if model is None or model.suffix.lower() != ".onnx":
        resolve_model_path(model)
    elif not model.is_file():
        _fail(f"{model}: ONNX file not found")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        stderr.print(
            f"[yellow]warning:[/yellow] listening on {host} without an API key: anyone who "
            "can reach this address can use the API (set PNEUMOSCAN_API_KEY)",
            highlight=False,
        )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    application = create_app(
        model, api_key, max_upload_bytes=round(max_upload_mb * MB),
        max_request_bytes=round(max_request_mb * MB), max_files=max_files, backend=backend,
    )  # fmt: skip
    stdout.print(
        f"pneumoscan serving on http://{host}:{port}/ (API docs at /docs); the model loads "
        "in the background (/health says when it is ready)",
        highlight=False,
    )
    uvicorn.run(application, host=host, port=port, log_level="info")


def info(model: ScoringModelOption = None) -> None:
    """Print a model file's metadata as JSON, with the file's path and SHA-256 under
    ``model_file`` (reads no weights)."""
    from pneumoscan.inference.export import file_sha256  # lazy: loads SciPy

    # lazy: the CLI loads only what a command runs
    from pneumoscan.models.modelfile import read_metadata, resolve_model_path

    if model is not None and model.suffix.lower() == ".onnx":
        from pneumoscan.inference.scorer import read_onnx_metadata  # lazy: loads SciPy

        path = Path(model)
        metadata = read_onnx_metadata(path)
    else:
        path = resolve_model_path(model)
        metadata = read_metadata(path)
    described = {"model_file": {"path": str(path), "sha256": file_sha256(path)}} | metadata
    head = (metadata.get("subtype") or {}).get("head")
    if isinstance(head, dict) and isinstance(head.get("weights"), list):
        # 1,280 numbers, one per line, would bury everything a person reads info for.
        described["subtype"] = metadata["subtype"] | {
            "head": head | {"weights": f"{len(head['weights'])} numbers (in the file)"}
        }
    stdout.print_json(json.dumps(described, default=str))
