"""The CLI's shared parts: the app, its one error handler, consoles and common options.

Heavy imports (TensorFlow, scikit-learn plots) happen inside the commands that need them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperCommand

from pneumoscan.constants import VERSION as __version__
from pneumoscan.errors import PneumoscanError

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


def _fmt_ci(interval: list[float | None]) -> str:
    low, high = interval
    return "n/a" if low is None or high is None or math.isnan(low) else f"{low:.3f}–{high:.3f}"
