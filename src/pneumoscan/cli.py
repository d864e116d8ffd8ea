"""Command-line interface: a thin layer over the package's functions.

Heavy imports (TensorFlow, scikit-learn plots) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pneumoscan import __version__
from pneumoscan.constants import DEFAULT_SEED, DEFAULT_VAL_FRACTION, SAMPLES_DIR
from pneumoscan.errors import PneumoscanError
from pneumoscan.progress import Reporter

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) drowns the CLI's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

app = typer.Typer(
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


def _fail(message: str, code: int = 2) -> None:
    stderr.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False))


def _jsonable(value: Any) -> Any:
    """Plain JSON: NumPy scalars unwrapped, NaN (an undefined rate) as null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


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
    from pneumoscan.audit import print_audit, write_audit

    try:
        result = write_audit(data, out, seed=seed, console=stderr)
    except PneumoscanError as exc:
        _fail(str(exc))
    print_audit(result, stdout)
    stdout.print(
        f"wrote {out / 'audit.json'}, {out / 'class_balance.png'}, {out / 'sample_grid.png'}"
    )


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
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")
    ] = False,
) -> None:
    """Train a model; checkpoints every epoch and writes config, history, curves and model."""
    from pneumoscan.models import list_models
    from pneumoscan.train import TrainOptions
    from pneumoscan.train import train as run_training

    if arch not in list_models():
        _fail(f"unknown architecture {arch!r}; choose one of {list_models()}")
    options = TrainOptions(
        data=str(data), out=str(out), arch=arch, epochs=epochs, batch_size=batch_size,
        learning_rate=learning_rate, seed=seed, val_fraction=val_fraction,
        max_images=max_images, resume=resume,
    )  # fmt: skip
    try:
        result = run_training(options, Reporter(stderr))
    except PneumoscanError as exc:
        _fail(str(exc))
    val = result.validation
    stdout.print(
        f"validation (patient-grouped split of the training data, not a test score): "
        f"AUC {_fmt(val['auc'])}, sensitivity {_fmt(val['sensitivity'])}, "
        f"specificity {_fmt(val['specificity'])} at threshold {val['threshold']:.2f}"
    )
    stdout.print(
        f"model: {result.model_path}  ({result.epochs_run} epochs, {result.seconds:.0f} s)"
    )
    if result.skipped:
        stdout.print(f"{len(result.skipped)} unreadable images skipped (see {out / 'skipped.csv'})")


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="Dataset root or folder with NORMAL/ PNEUMONIA/.")],
    model: ModelOption = None,
    split: Annotated[str, typer.Option(help="Split of a dataset root to evaluate.")] = "test",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the metrics as JSON.")
    ] = None,
    plot: Annotated[Path, typer.Option(help="Confusion-matrix heatmap PNG.")] = Path(
        "confusion_matrix.png"
    ),
    batch_size: Annotated[int, typer.Option(help="Images scored at a time.")] = 32,
) -> None:
    """Classification report, confusion matrix and ROC AUC on labelled images."""
    from pneumoscan.evaluate import evaluate as run_evaluation

    try:
        metrics = run_evaluation(data, model, split, batch_size, plot, Reporter(stderr))
    except PneumoscanError as exc:
        _fail(str(exc))
    where = f"split {metrics['split']}, n={metrics['n']}"
    stdout.print(f"model {metrics['model']} on {metrics['data']} ({where})")
    stdout.print(metrics["report"])
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    table = Table(title=f"Confusion matrix at threshold {metrics['threshold']:.3f}")
    for column in ("", "predicted NORMAL", "predicted PNEUMONIA"):
        table.add_column(column)
    table.add_row("true NORMAL", str(tn), str(fp))
    table.add_row("true PNEUMONIA", str(fn), str(tp))
    stdout.print(table)
    stdout.print(
        f"ROC AUC {_fmt(metrics['auc'])}  sensitivity {_fmt(metrics['sensitivity'])}  "
        f"specificity {_fmt(metrics['specificity'])}  accuracy {_fmt(metrics['accuracy'])}"
    )
    if metrics["skipped"]:
        stdout.print(f"{len(metrics['skipped'])} unreadable images skipped")
    stdout.print(f"wrote {plot}")
    if json_out:
        _write_json(json_out, {k: v for k, v in metrics.items() if k != "report"})


@app.command()
def predict(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Image files or folders (recursive).")
    ] = None,
    model: ModelOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write results as JSON.")] = None,
    samples: Annotated[
        bool, typer.Option(help="Also predict the sample X-rays shipped with pneumoscan.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images scored at a time.")] = 32,
) -> None:
    """P(pneumonia) and a decision per file; unreadable files are listed, never fatal."""
    from pneumoscan.modelfile import load_model
    from pneumoscan.predict import expand_inputs, predict_files

    inputs = [*(paths or []), *(sorted(SAMPLES_DIR.glob("*/*.jpeg")) if samples else [])]
    if not inputs:
        _fail("give image files or folders, or --samples")
    files, results = expand_inputs(inputs)
    try:
        loaded = load_model(model)
    except PneumoscanError as exc:
        _fail(str(exc))
    table = Table(title=f"pneumoscan {loaded.name} (threshold {loaded.threshold:.3f})")
    for column in ("file", "status", "P(pneumonia)", "decision"):
        table.add_column(column)
    for result in predict_files(loaded, files, batch_size=batch_size):
        results.append(result)
    for result in results:
        if result["status"] == "ok":
            table.add_row(result["path"], "ok", f"{result['probability']:.3f}", result["decision"])
        else:
            table.add_row(result["path"], "[red]error[/red]", "", result["error"])
    stdout.print(table)
    if json_out:
        _write_json(json_out, {"model": str(loaded.path), "results": results})
    if not any(r["status"] == "ok" for r in results):
        _fail("no input could be read", code=1)


@app.command()
def models() -> None:
    """List the registered architectures."""
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


@app.command()
def info(model: ModelOption = None) -> None:
    """Print a model file's metadata (reads no weights)."""
    from pneumoscan.modelfile import read_metadata, resolve_model_path

    try:
        path = resolve_model_path(model)
        metadata = read_metadata(path)
    except PneumoscanError as exc:
        _fail(str(exc))
    stdout.print(f"{path}")
    stdout.print_json(json.dumps(metadata, default=str))


def run() -> None:
    """Entry point that also works as ``python -m pneumoscan``."""
    app(prog_name="pneumoscan")


if __name__ == "__main__":
    run()
