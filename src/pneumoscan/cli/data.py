"""`pneumoscan audit` and `audit-model`: looking at data sets before training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from pneumoscan.cli.common import (
    ScoringModelOption,
    _fmt_ci,
    stderr,
    stdout,
)
from pneumoscan.constants import (
    DEFAULT_SEED,
)
from pneumoscan.formatting import format_threshold
from pneumoscan.jsonio import write_json
from pneumoscan.progress import Reporter


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
