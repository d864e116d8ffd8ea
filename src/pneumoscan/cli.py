"""Command-line interface: a thin layer over the package's functions.

Heavy imports (TensorFlow, scikit-learn plots) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperCommand

from pneumoscan.constants import (
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    DEFAULT_SITE_TARGET_SENSITIVITY,
    DEFAULT_TARGET_SENSITIVITY,
    DEFAULT_VAL_FRACTION,
    SAMPLES_DIR,
)
from pneumoscan.constants import VERSION as __version__
from pneumoscan.errors import PneumoscanError
from pneumoscan.formatting import format_probability, format_threshold
from pneumoscan.jsonio import write_json
from pneumoscan.progress import Reporter

# TF_CPP_MIN_LOG_LEVEL (TensorFlow's start-up lines) is set in pneumoscan/__init__.py, which
# runs before this module and before any TensorFlow import.


class _Command(TyperCommand):
    """A command whose deliberate failures (:class:`PneumoscanError`) end as one ``error:``
    line and exit status 2: the CLI's one error handler."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except PneumoscanError as exc:
            _fail(str(exc))


class _Typer(typer.Typer):
    """A Typer app whose commands all use :class:`_Command`."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _Typer(
    help="Flag pneumonia on pediatric frontal chest X-rays (triage support, not a diagnosis).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stdout = Console()
stderr = Console(stderr=True)

ModelOption = Annotated[
    Path | None,
    typer.Option("--model", "-m", help="Model file or run folder (default: the shipped model)."),
]
ScoringModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model", "-m", help="Model file, run folder or exported .onnx (default: shipped)."
    ),
]


def _fail(message: str, code: int = 2) -> NoReturn:
    stderr.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _fmt(value: float) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.3f}"
    )


@app.callback(invoke_without_command=True)
def main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """pneumoscan: audit, train, evaluate and predict."""
    if version:
        stdout.print(__version__)
        raise typer.Exit()


@app.command()
def audit(
    data: Annotated[Path, typer.Argument(help="Dataset root or folder with NORMAL/ PNEUMONIA/.")],
    out: Annotated[Path, typer.Option(help="Folder for audit.json and the figures.")] = Path(
        "audit"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the sample grid.")] = DEFAULT_SEED,
) -> None:
    """Counts, size gap between classes, duplicates, shared patients, unreadable files."""
    from pneumoscan.data.audit import print_audit, write_audit  # lazy: loads pandas

    result = write_audit(data, out, seed=seed, console=stderr)
    print_audit(result, stdout)
    stdout.print(
        f"wrote {out / 'audit.json'}, {out / 'class_balance.png'}, {out / 'sample_grid.png'}"
    )


@app.command("audit-model")
def audit_model(
    data: Annotated[
        Path, typer.Option("--data", help="Labelled folder with NORMAL/ PNEUMONIA/ to perturb.")
    ],
    model: ScoringModelOption = None,
    perturbation: Annotated[
        list[str] | None,
        typer.Option(help="Only these perturbations (repeatable; default: all)."),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the findings.")] = None,
) -> None:
    """Shortcut audit: how far P(pneumonia) moves when markers, text, borders, exposure or
    orientation change (mean shift with 95% CI, and the share of decisions that flip)."""
    from pneumoscan.evaluate.shortcuts import audit_model as run_audit  # lazy: loads pandas

    result = run_audit(data, model, perturbation, reporter=Reporter(stderr))
    table = Table(
        title=f"Shortcut audit on {data} (n={result['n']}, {result['n_pneumonia']} pneumonia; "
        f"threshold {format_threshold(result['threshold'])})"
    )
    for column in (
        "perturbation", "mean shift (95% CI)", "normal", "pneumonia", "mean |shift|",
        "decisions flipped (95% CI)",
    ):  # fmt: skip
        table.add_column(column)
    for f in result["findings"]:
        table.add_row(
            f["name"],
            f"{f['mean_shift']:+.4f} "
            f"({f['mean_shift_ci'][0]:+.4f} to {f['mean_shift_ci'][1]:+.4f})",
            f"{f['mean_shift_normal']:+.4f}",
            f"{f['mean_shift_pneumonia']:+.4f}",
            f"{f['mean_abs_shift']:.4f}",
            f"{f['flipped']} = {f['flip_rate']:.1%} ({_fmt_ci(list(f['flip_rate_ci']))})",
        )
    stdout.print(table)
    stdout.print(
        "Shift = P(pneumonia) after minus before, on the same images; intervals resample "
        "patients (shift) or count images (Wilson, flips). A change that is not disease "
        "should move nothing."
    )
    if json_out:
        write_json(json_out, result)


@app.command()
def train(
    data: Annotated[
        Path, typer.Option("--data", help="Dataset root (train/ [val/]) or class folder root.")
    ],
    out: Annotated[Path, typer.Option(help="Run folder to write.")] = Path("runs/latest"),
    arch: Annotated[
        str, typer.Option(help="Registered architecture (see `pneumoscan models`).")
    ] = "seed",
    epochs: Annotated[int | None, typer.Option(help="Default: the architecture's recipe.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Default: the recipe's.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Default: the recipe's.")] = None,
    seed: Annotated[
        int, typer.Option(help="Seed for the split, shuffling and weights.")
    ] = DEFAULT_SEED,
    val_fraction: Annotated[
        float,
        typer.Option(help="Share of training patients held out when val/ is missing or tiny."),
    ] = DEFAULT_VAL_FRACTION,
    max_images: Annotated[
        int | None,
        typer.Option(help="Train on about this many images (whole patients), for quick runs."),
    ] = None,
    augment: Annotated[
        str | None, typer.Option(help="Augmentation: none or xray (default: the recipe's).")
    ] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Default: the recipe's.")] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="float32 or mixed_bfloat16 while training. Default: the recipe's."),
    ] = None,
    intensity: Annotated[
        str | None,
        typer.Option(help="Intensity normalisation: none or equalize (default: the arch's)."),
    ] = None,
    batchnorm: Annotated[
        str | None,
        typer.Option(help="Batch norm while training: trainable or frozen (default: recipe's)."),
    ] = None,
    select_on: Annotated[
        str | None,
        typer.Option(help="Epoch kept: best val_auc or val_loss (default: the recipe's)."),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(help="Distil from these model files (comma-separated; their mean)."),
    ] = None,
    distill_weight: Annotated[
        float, typer.Option(help="Weight of the teachers' scores in the target, in (0, 1].")
    ] = 0.5,
    keep_checkpoints: Annotated[
        bool, typer.Option(help="Keep every epoch's network in checkpoints/epoch-N.keras.")
    ] = False,
    target_sensitivity: Annotated[
        float, typer.Option(help="Validation sensitivity the operating threshold is chosen for.")
    ] = DEFAULT_TARGET_SENSITIVITY,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="Decoded-image cache (default: $PNEUMOSCAN_CACHE or ~/.cache/pneumoscan)."
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Decode every image into memory; no cache.")
    ] = False,
) -> None:
    """Train a model; checkpoints every epoch and writes config, history, curves and model."""
    from pneumoscan.models import list_models  # lazy: the CLI loads only what a command runs
    from pneumoscan.train.loop import PRECISIONS, TrainOptions  # lazy: loads pandas
    from pneumoscan.train.loop import train as run_training  # lazy: loads pandas

    if arch not in list_models():
        _fail(f"unknown architecture {arch!r}; choose one of {list_models()}")
    if precision is not None and precision not in PRECISIONS:
        _fail(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    options = TrainOptions(
        data=str(data), out=str(out), arch=arch, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, seed=seed, val_fraction=val_fraction,
        max_images=max_images, augment=augment, label_smoothing=label_smoothing,
        precision=precision, intensity=intensity, batchnorm=batchnorm, select_on=select_on,
        teacher=teacher, distill_weight=distill_weight, keep_checkpoints=keep_checkpoints,
        target_sensitivity=target_sensitivity, resume=resume,
    )  # fmt: skip
    result = run_training(options, Reporter(stderr), cache_dir=cache_dir, use_cache=not no_cache)
    val = result.validation
    stdout.print(
        f"validation (patient-grouped split of the training data, not a test score): "
        f"AUC {_fmt(val['auc'])}, sensitivity {_fmt(val['sensitivity'])}, "
        f"specificity {_fmt(val['specificity'])} at threshold {format_threshold(val['threshold'])}"
    )
    stdout.print(
        f"model: {result.model_path}  ({result.epochs_run} epochs, {result.seconds:.0f} s)"
    )
    if result.skipped:
        stdout.print(f"{len(result.skipped)} unreadable images skipped (see {out / 'skipped.csv'})")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="Dataset root or folder with NORMAL/ PNEUMONIA/.")],
    model: ScoringModelOption = None,
    split: Annotated[str, typer.Option(help="Split of a dataset root to evaluate.")] = "test",
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the metrics and every image's score as JSON."),
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write the confusion-matrix heatmap to this PNG.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images scored at a time.")] = 32,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples (over patients) for the AUC and F1 CIs.")
    ] = DEFAULT_RESAMPLES,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = DEFAULT_SEED,
) -> None:
    """Classification report, confusion matrix, ROC AUC and every rate with its 95% CI."""
    from pneumoscan.evaluate.scoring import evaluate as run_evaluation  # lazy: loads pandas

    metrics = run_evaluation(
        data, model, split, batch_size, plot, Reporter(stderr), bootstrap, seed
    )
    where = f"split {metrics['split']}, n={metrics['n']}"
    stdout.print(f"model {metrics['model']} on {metrics['data']} ({where})")
    stdout.print(metrics["report"])
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    table = Table(title=f"Confusion matrix at threshold {format_threshold(metrics['threshold'])}")
    for column in ("", "predicted NORMAL", "predicted PNEUMONIA"):
        table.add_column(column)
    table.add_row("true NORMAL", str(tn), str(fp))
    table.add_row("true PNEUMONIA", str(fn), str(tp))
    stdout.print(table)
    stdout.print(
        f"ROC AUC {_fmt(metrics['auc'])}  sensitivity {_fmt(metrics['sensitivity'])}  "
        f"specificity {_fmt(metrics['specificity'])}  accuracy {_fmt(metrics['accuracy'])}"
    )
    _print_uncertainty(metrics)
    if metrics["skipped"]:
        stdout.print(f"{len(metrics['skipped'])} unreadable images skipped")
    if plot is not None:
        stdout.print(f"wrote {plot}")
    if json_out:
        write_json(json_out, {k: v for k, v in metrics.items() if k != "report"})


@app.command()
def predict(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Image files or folders (recursive).")
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", "-m", help="Model file, run folder or exported .onnx (default: shipped)."
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    samples: Annotated[
        bool, typer.Option(help="Also predict the sample X-rays shipped with pneumoscan.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images scored at a time.")] = 32,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Stream results to a .csv or .jsonl file as they come."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Append to --out, skipping files already ok or rejected there.")
    ] = False,
    heatmaps: Annotated[
        Path | None, typer.Option(help="Folder for a Grad-CAM overlay PNG per accepted image.")
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
) -> None:
    """P(pneumonia) and a decision per file; non-X-rays are rejected, bad files listed."""
    from pneumoscan.inference.backends import open_model  # lazy: loads SciPy
    from pneumoscan.inference.predict import (  # lazy: loads SciPy
        ResultWriter,
        completed_paths,
        expand_inputs,
        load_detector,
        model_provenance,
        predict_files,
        stamp,
        summarise,
    )

    if sort not in TABLE_SORTS:
        _fail(f"unknown --sort {sort!r}; choose one of {', '.join(TABLE_SORTS)}")

    inputs = [*(paths or []), *(sorted(SAMPLES_DIR.glob("*/*.jpeg")) if samples else [])]
    if not inputs:
        _fail("give image files or folders, or --samples")
    if resume and out is None:
        _fail("--resume needs --out FILE (the results file to continue)")
    files, results = expand_inputs(inputs)
    writer = ResultWriter(out, resume=resume) if out is not None else None
    skipped = 0
    if resume and out is not None and writer is not None:
        done = completed_paths(out)
        skipped = len(done & set(files))
        stderr.print(f"resuming {out}: {skipped} files already done", highlight=False)
        files = [f for f in files if f not in done]
        # Retried files and re-listed problems replace their earlier rows: one row per path.
        writer.forget([*files, *(r["path"] for r in results)])
    loaded, network, note = open_model(model, backend, onnx, keras_network=bool(heatmaps))
    if note:
        stderr.print(note, highlight=False)
    provenance = model_provenance(loaded)
    results = [stamp(problem, provenance) for problem in results]
    detector = load_detector(loaded) if ood_check else None
    if ood_check and detector is None:
        stderr.print(
            f"{loaded.name} has no fitted OOD detector: only the cheap checks run "
            "(add one with `pneumoscan fit-ood`)",
            highlight=False,
        )
    stream = predict_files(
        loaded, files, batch_size, ood_check=ood_check, heatmaps=heatmaps,
        heatmap_network=network, workers=workers, detector=detector, provenance=provenance,
    )  # fmt: skip
    started = time.perf_counter()
    if writer is not None:
        for problem in results:
            writer.write(problem)
    failure: Exception | None = None
    try:
        with Reporter(stderr).task("predicting", total=len(files)) as advance:
            for result in stream:
                results.append(result)
                if writer is not None:
                    writer.write(result)
                advance(1)
    except Exception as exc:  # only the model can fail here: keep what was done, say so
        failure = exc
    finally:
        if writer is not None:
            writer.close()
    if failure is not None:
        _stop_after_model_failure(failure, results, json_out, out, loaded.path, len(files))
    _print_predictions(
        results,
        f"pneumoscan {loaded.name} (threshold {format_threshold(loaded.threshold)})",
        loaded.threshold,
        sort,
    )
    seconds = time.perf_counter() - started
    counts = summarise(results)
    stdout.print(
        f"{counts['ok']} ok, {counts['rejected']} rejected (not a frontal chest X-ray), "
        f"{counts['error']} unreadable; {len(files)} files in {seconds:.1f} s "
        f"({len(files) / max(seconds, 1e-9):.1f} images/s, {loaded.name}, "
        f"{'onnx' if loaded.path.suffix == '.onnx' else 'keras'})"
        + (f"; results in {out}" if out else ""),
        highlight=False,
    )
    if json_out:
        write_json(json_out, {"model": str(loaded.path), "results": results})
    if results and counts["ok"] + counts["rejected"] + skipped == 0:
        _fail("no input could be read", code=1)


def _stop_after_model_failure(
    failure: Exception,
    results: list[dict[str, Any]],
    json_out: Path | None,
    out: Path | None,
    model_path: Path,
    total: int,
) -> None:
    """End a run whose model failed, keeping every result written so far (files never end a
    run: their failures are results)."""
    if json_out:
        write_json(json_out, {"model": str(model_path), "results": results, "incomplete": True})
    kept = f"; the {len(results)} results so far are in {out}" if out else ""
    resume = f" (continue with --resume --out {out})" if out else ""
    _fail(
        f"the model failed after {len(results)} of {total} files: "
        f"{type(failure).__name__}: {failure}{kept}{resume}",
        code=1,
    )


#: Above this many results, predict prints counts instead of a table row per file.
MAX_TABLE_ROWS = 200
#: Orders of predict's printed table (the first is the default).
TABLE_SORTS = ("probability", "path", "input")


def sort_results(results: list[dict[str, Any]], order: str) -> list[dict[str, Any]]:
    """Results in a table order: ``probability`` (scored files by falling P(pneumonia), then
    rejected, then unreadable files, each in input order), ``path`` or ``input``."""
    if order == "input":
        return list(results)
    if order == "path":
        return sorted(results, key=lambda r: str(r["path"]))
    if order != "probability":
        raise ValueError(f"unknown order {order!r}; choose one of {TABLE_SORTS}")
    rank = {"ok": 0, "rejected": 1}
    return sorted(
        results,
        key=lambda r: (rank.get(r["status"], 2), -float(r.get("probability") or 0.0)),
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
    results: list[dict[str, Any]],
    title: str,
    threshold: float | None = None,
    order: str = "probability",
) -> None:
    if len(results) > MAX_TABLE_ROWS:
        return
    names = display_names([str(r["path"]) for r in results])
    table = Table(title=title)
    table.add_column("file", overflow="fold")
    for column in ("status", "P(pneumonia)", "decision / reason"):
        table.add_column(column)
    for result in sort_results(results, order):
        name = Text(names[str(result["path"])])  # a file name is never Rich markup
        if result["status"] == "ok":
            probability = format_probability(result["probability"], threshold)
            table.add_row(name, "ok", probability, result["decision"])
        elif result["status"] == "rejected":
            table.add_row(name, "[yellow]rejected[/yellow]", "", result["reason"])
        else:
            table.add_row(name, "[red]error[/red]", "", result["error"])
    stdout.print(table)


@app.command("export")
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


@app.command("fit-ood")
def fit_ood_command(
    data: Annotated[
        Path, typer.Option("--data", help="The data set the model was trained on (not test).")
    ],
    out: Annotated[Path, typer.Option(help="Model file to write, with the OOD detector.")],
    model: ModelOption = None,
    check: Annotated[
        list[Path] | None,
        typer.Option(help="Folder of X-rays that must pass (e.g. another site's); repeatable."),
    ] = None,
    retention: Annotated[
        float, typer.Option(help="Share of the training images the detector must accept.")
    ] = 0.995,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
) -> None:
    """Fit the out-of-distribution detector on the model's training images and store it."""
    from pneumoscan.inference.ood_fit import fit_ood  # lazy: loads pandas

    ood = fit_ood(
        model, data, out, check or [], retention, batch_size=batch_size,
        reporter=Reporter(stderr),
    )  # fmt: skip
    fitted, rates = ood["fitted_on"], ood["training_rejection"]
    stdout.print(
        f"fitted on {fitted['n_images']} images of {fitted['n_patients']} patients "
        f"(layers {', '.join(ood['layers']) or 'none'}); training images rejected: "
        f"{rates['out_of_fold']:.2%} out of fold, {rates['in_sample']:.2%} in sample",
        highlight=False,
    )
    for folder, found in ood["checks"].items():
        stdout.print(
            f"check {folder}: {found['rejected']} of {found['n']} rejected", highlight=False
        )
        for item in found["rejected_files"]:
            stdout.print(f"  {item['path']}: {item['reason']}", highlight=False)
    stdout.print(f"wrote {out}")


@app.command()
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


def _figures_row(name: str, figures: dict[str, Any]) -> list[str]:
    def with_ci(key: str) -> str:
        low, high = figures[f"{key}_ci"]
        return f"{_fmt(figures[key])} ({_fmt(low)}-{_fmt(high)})"

    threshold = format_threshold(figures["threshold"]) if "threshold" in figures else "per fold"
    return [name, threshold, with_ci("sensitivity"), with_ci("specificity"), _fmt(figures["ece"])]


@app.command()
def calibrate(
    data: Annotated[
        Path, typer.Option("--data", help="Labelled local sample: NORMAL/ PNEUMONIA/.")
    ],
    out: Annotated[Path, typer.Option(help="Calibrated model file to write.")],
    model: ModelOption = None,
    target_sensitivity: Annotated[
        float,
        typer.Option(help="Sensitivity the new threshold must reach (with --confidence)."),
    ] = DEFAULT_SITE_TARGET_SENSITIVITY,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures.")] = None,
    unlabelled: Annotated[
        Path | None,
        typer.Option(help="Site X-rays without labels: re-estimate batch-norm statistics first."),
    ] = None,
    confidence: Annotated[
        float,
        typer.Option(
            help="One-sided confidence with which the sample's sensitivity must reach the "
            "target (0.5 = no margin)."
        ),
    ] = DEFAULT_CONFIDENCE,
    onnx: Annotated[
        bool, typer.Option(help="Write the ONNX export beside --out (predict's fast path).")
    ] = True,
    refit_head: Annotated[
        bool,
        typer.Option(
            help="Also refit the final layer on training + site features (the site's weight "
            "chosen by patient-grouped cross-validation)."
        ),
    ] = False,
    train_data: Annotated[
        Path | None,
        typer.Option(help="The model's training data, for --refit-head (default: recorded)."),
    ] = None,
) -> None:
    """Refit temperature and threshold to a site's labelled sample.

    Learned weights never change; with --unlabelled, batch-norm statistics are re-estimated.
    """
    from pneumoscan.train.site import calibrate_to_site  # lazy: loads SciPy

    result = calibrate_to_site(
        model, data, out, target_sensitivity, reporter=Reporter(stderr),
        unlabelled=unlabelled, confidence=confidence, export=onnx,
        refit_head=refit_head, train_data=train_data,
    )  # fmt: skip
    table = Table(
        title=f"Site calibration on {data} (n={result['n']}, {result['n_pneumonia']} pneumonia)"
    )
    for column in ("", "threshold", "sensitivity (95% CI)", "specificity (95% CI)", "ECE"):
        table.add_column(column)
    table.add_row(*_figures_row("before", result["before"]))
    table.add_row(*_figures_row("after, on the sample itself", result["after"]))
    cv = result["cross_validated"]
    if cv:
        name = f"expected on new images ({cv['repeats']}x {cv['folds']}-fold cross-validated)"
        table.add_row(*_figures_row(name, cv))
    stdout.print(table)
    written = f"{out}" + (f" and {result['onnx']}" if result.get("onnx") else "")
    stdout.print(
        f"temperature {result['temperature']:.3f}, logit bias {result['logit_bias']:+.3f}, "
        f"threshold {format_threshold(result['threshold'])} "
        f"(target sensitivity {target_sensitivity}, "
        f"held at a one-sided {confidence:.0%} lower bound on the sample); wrote {written}"
    )
    stdout.print(
        "The 'on the sample itself' row is optimistic: the threshold was chosen on those images. "
        "The 'expected' row estimates how the same procedure does on new images of this site, "
        "by refitting without each held-out patient."
    )
    if json_out:
        write_json(json_out, result)


@app.command()
def serve(
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", "-m", help="Model file, run folder or exported .onnx (default: shipped)."
        ),
    ] = None,
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


@app.command()
def info(model: ScoringModelOption = None) -> None:
    """Print a model file's metadata (reads no weights)."""
    # lazy: the CLI loads only what a command runs
    from pneumoscan.models.modelfile import read_metadata, resolve_model_path

    path = resolve_model_path(model)
    if path.suffix.lower() == ".onnx":
        from pneumoscan.inference.scorer import read_onnx_metadata  # lazy: loads SciPy

        metadata = read_onnx_metadata(path)
    else:
        metadata = read_metadata(path)
    stdout.print(f"{path}")
    stdout.print_json(json.dumps(metadata, default=str))


def _fmt_ci(interval: list[float | None]) -> str:
    low, high = interval
    return "n/a" if low is None or high is None or math.isnan(low) else f"{low:.3f}–{high:.3f}"


def _print_uncertainty(metrics: dict[str, Any]) -> None:
    """The evaluation's rates with 95% CIs, calibration and per-subtype sensitivity."""
    boot = metrics["bootstrap"]
    resampled = f"bootstrap, {boot['n_units']} {boot['unit']}s"
    table = Table(
        title=f"95% confidence intervals (n={metrics['n']} images, threshold "
        f"{format_threshold(metrics['threshold'])})"
    )
    for column in ("metric", "value", "95% CI", "method"):
        table.add_column(column)
    for label, key, method in (
        ("ROC AUC", "auc", resampled),
        ("PR AUC", "pr_auc", resampled),
        ("sensitivity", "sensitivity", "Wilson"),
        ("specificity", "specificity", "Wilson"),
        ("PPV", "ppv", "Wilson"),
        ("NPV", "npv", "Wilson"),
        ("F1", "f1", resampled),
        ("accuracy", "accuracy", "Wilson"),
    ):
        table.add_row(label, _fmt(metrics[key]), _fmt_ci(metrics[f"{key}_ci"]), method)
    stdout.print(table)
    stdout.print(
        f"calibration: ECE {_fmt(metrics['ece'])} (10 bins), Brier {_fmt(metrics['brier'])}"
    )
    subtypes = [
        f"{name} {_fmt(s['sensitivity'])} ({s['detected']}/{s['n']}, {_fmt_ci(s['ci'])})"
        for name, s in metrics["per_subtype"].items()
    ]
    if subtypes:
        stdout.print("sensitivity by subtype: " + ", ".join(subtypes))
    sources = [
        f"{name} {_fmt(s['specificity'])} ({s['cleared']}/{s['n']}, {_fmt_ci(s['ci'])})"
        for name, s in metrics.get("per_source", {}).items()
    ]
    if sources:
        stdout.print("specificity by source series: " + ", ".join(sources))
    stdout.print(
        f"AUC, PR AUC and F1 intervals: {boot['n_resamples']} bootstrap resamples of "
        f"{boot['unit']}s (seed {boot['seed']}); rates: Wilson intervals on image counts"
    )


@app.command()
def compare(
    model_a: Annotated[Path, typer.Argument(help="Model file, run folder or .onnx export A.")],
    model_b: Annotated[Path, typer.Argument(help="Model file, run folder or .onnx export B.")],
    data: Annotated[
        Path, typer.Option("--data", help="Dataset root or folder with NORMAL/ PNEUMONIA/.")
    ],
    split: Annotated[
        str, typer.Option(help="Split of a dataset root (val: model A's validation split).")
    ] = "test",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the comparison as JSON.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images scored at a time.")] = 32,
    bootstrap: Annotated[
        int, typer.Option(help="Paired bootstrap resamples (patients).")
    ] = DEFAULT_RESAMPLES,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = DEFAULT_SEED,
) -> None:
    """Compare two models on the same images: ROC AUC difference with a paired bootstrap CI."""
    from pneumoscan.evaluate.compare import compare_models  # lazy: loads pandas

    result = compare_models(
        model_a, model_b, data, split, batch_size, Reporter(stderr), bootstrap, seed
    )
    stdout.print(
        f"{result['data']} (split {result['split']}, n={result['n']} images, "
        f"{result['n_patients']} patients)"
    )
    for key in ("a", "b"):
        stdout.print(f"{result['name_' + key]}: {result['model_' + key]}", highlight=False)
    table = Table(title="Paired comparison on the same images (value and 95% CI)")
    for column in ("", "A", "B"):
        table.add_column(column)
    a, b = result["a"], result["b"]
    for label, key in (
        ("ROC AUC", "auc"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
    ):
        table.add_row(
            label,
            *(f"{_fmt(m[key])} ({_fmt_ci(m[key + '_ci'])})" for m in (a, b)),
        )
    table.add_row("threshold", format_threshold(a["threshold"]), format_threshold(b["threshold"]))
    stdout.print(table)
    difference = result["auc_difference"]
    low, high = difference["ci"]
    signed = "n/a" if low is None or math.isnan(low) else f"{low:+.3f} to {high:+.3f}"
    stdout.print(
        f"AUC difference (B - A) {difference['difference']:+.4f}, 95% CI "
        f"{signed} (paired bootstrap over patients, "
        f"{difference['n_resamples']} resamples), p = {_fmt(difference['p_value'])}"
    )
    stdout.print(f"verdict: {result['verdict']}")
    if json_out:
        write_json(json_out, result)


@app.command()
def report(
    data: Annotated[
        Path, typer.Option("--data", help="Dataset root or folder with NORMAL/ PNEUMONIA/.")
    ],
    model: ModelOption = None,
    out: Annotated[Path, typer.Option(help="HTML file to write.")] = Path("report.html"),
    split: Annotated[
        str, typer.Option(help="Split of a dataset root (val: the model's validation split).")
    ] = "test",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the report's metrics as JSON.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images scored at a time.")] = 32,
    bootstrap: Annotated[
        int, typer.Option(help="Bootstrap resamples (patients).")
    ] = DEFAULT_RESAMPLES,
    seed: Annotated[int, typer.Option(help="Bootstrap and sample-grid seed.")] = DEFAULT_SEED,
) -> None:
    """One self-contained HTML evaluation report: curves, calibration, sweep, errors, card."""
    from pneumoscan.evaluate.report import build_report  # lazy: loads pandas

    result = build_report(out, data, model, split, batch_size, Reporter(stderr), bootstrap, seed)
    metrics = result.metrics
    stdout.print(
        f"ROC AUC {_fmt(metrics['auc'])} ({_fmt_ci(metrics['auc_ci'])})  sensitivity "
        f"{_fmt(metrics['sensitivity'])} ({_fmt_ci(metrics['sensitivity_ci'])})  specificity "
        f"{_fmt(metrics['specificity'])} ({_fmt_ci(metrics['specificity_ci'])})  "
        f"n={metrics['n']}"
    )
    stdout.print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.seconds:.1f} s)")
    if json_out:
        write_json(json_out, {k: v for k, v in metrics.items() if k != "report"})


def run() -> None:
    """Entry point that also works as ``python -m pneumoscan``."""
    app(prog_name="pneumoscan")


if __name__ == "__main__":
    run()
