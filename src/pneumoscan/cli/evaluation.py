"""`pneumoscan evaluate`, `compare` and `report`: measuring models."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pneumoscan.cli.common import (
    ScoringModelOption,
    _fail,
    _fmt,
    _fmt_ci,
    stderr,
    stdout,
)
from pneumoscan.constants import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
)
from pneumoscan.formatting import format_threshold
from pneumoscan.jsonio import write_json
from pneumoscan.progress import Reporter


def evaluate(
    data: Annotated[
        Path | None,
        typer.Argument(help="Dataset root or folder with NORMAL/ PNEUMONIA/ (or --data)."),
    ] = None,
    model: ScoringModelOption = None,
    data_option: Annotated[
        Path | None,
        typer.Option("--data", help="The data set, as compare and report take it (or DATA)."),
    ] = None,
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
    """Classification report, confusion matrix, ROC AUC and every rate with its 95% CI; for a
    model with a subtype head, its bacterial-or-viral figures on the named pneumonias."""
    from pneumoscan.evaluate.scoring import evaluate as run_evaluation  # lazy: loads pandas

    if (data is None) == (data_option is None):
        _fail("give the data set once: evaluate DATA, or evaluate --data DATA")
    data = data if data is not None else data_option
    assert data is not None  # one of the two, checked above
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
    _print_subtype(metrics)
    if metrics["skipped"]:
        stdout.print(f"{len(metrics['skipped'])} unreadable images skipped")
    if plot is not None:
        stdout.print(f"wrote {plot}")
    if json_out:
        write_json(json_out, {k: v for k, v in metrics.items() if k != "report"})


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


def _print_subtype(metrics: dict[str, Any]) -> None:
    """The subtype head's figures on the named pneumonias, when they were measured."""
    block = metrics.get("subtype")
    if not block:
        return
    stdout.print(
        f"Subtype (bacterial vs viral; {block['label']}): "
        f"AUC {_fmt(block['auc'])} ({_fmt_ci(block['auc_ci'])}), "
        f"bacterial sensitivity {_fmt(block['bacterial_sensitivity'])} "
        f"({_fmt_ci(block['bacterial_sensitivity_ci'])}), "
        f"viral specificity {_fmt(block['viral_specificity'])} "
        f"({_fmt_ci(block['viral_specificity_ci'])}), "
        f"ECE {_fmt(block['ece'])}, on {block['n']} pneumonias",
        highlight=False,
    )
    stdout.print(
        f"  {block['n_bacterial']} bacterial, {block['n_viral']} viral, every named pneumonia "
        f"whatever the pneumonia decision; threshold "
        f"{format_threshold(block['threshold'])} on {block['threshold_applies_to']}; AUC "
        f"interval: bootstrap over {block['bootstrap']['n_units']} "
        f"{block['bootstrap']['unit']}s, rates: Wilson",
        highlight=False,
    )
    if block.get("in_sample"):
        # Beside the figures it qualifies, where a reader of the output cannot miss it.
        stdout.print(f"  in-sample: {block['in_sample']}", highlight=False)


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
    for kind in a["per_subtype"]:
        table.add_row(
            f"sensitivity, {kind}",
            *(
                f"{_fmt(m['per_subtype'][kind]['sensitivity'])} "
                f"({_fmt_ci(m['per_subtype'][kind]['ci'])})"
                for m in (a, b)
            ),
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


def report(
    data: Annotated[
        Path, typer.Option("--data", help="Dataset root or folder with NORMAL/ PNEUMONIA/.")
    ],
    model: ScoringModelOption = None,
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
    shortcut_audit: Annotated[
        bool, typer.Option(help="Add the shortcut audit (markers, borders, exposure, flip).")
    ] = False,
) -> None:
    """One self-contained HTML evaluation report: curves, calibration, sweep, errors, card."""
    from pneumoscan.evaluate.report import build_report  # lazy: loads pandas

    result = build_report(
        out, data, model, split, batch_size, Reporter(stderr), bootstrap, seed,
        shortcut_audit=shortcut_audit,
    )  # fmt: skip
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
