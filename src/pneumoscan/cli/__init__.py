"""Command-line interface: a thin layer over the package's functions, one module per group of
verbs (:mod:`.data`, :mod:`.training`, :mod:`.scoring`, :mod:`.evaluation`, :mod:`.interop`) on
the shared app and error handler of :mod:`.common`.

Heavy imports (TensorFlow, scikit-learn plots) happen inside the commands that need them.
"""

from __future__ import annotations

from pneumoscan.cli import data, evaluation, interop, scoring, training
from pneumoscan.cli.common import app
from pneumoscan.cli.scoring import TABLE_SORTS, display_names, sort_results

__all__ = ["TABLE_SORTS", "app", "display_names", "run", "sort_results"]

# Registered here, in one place, in the order `pneumoscan --help` lists them.
app.command()(data.audit)
app.command("audit-model")(data.audit_model)
app.command()(training.train)
app.command()(evaluation.evaluate)
app.command()(scoring.predict)
app.command("export")(scoring.export_model)
app.command("fit-ood")(training.fit_ood_command)
app.command()(scoring.models)
app.command()(training.calibrate)
app.command()(scoring.serve)
app.command()(interop.pacs)
app.command()(scoring.info)
app.command()(evaluation.compare)
app.command()(evaluation.report)


def run() -> None:
    """Entry point that also works as ``python -m pneumoscan``."""
    app(prog_name="pneumoscan")


if __name__ == "__main__":
    run()
