"""pneumoscan quickstart: load the shipped model, predict, draw a heatmap, evaluate.

Run from the repository root (the default labelled folder is ../shared/data/site_sample):

    .venv/bin/python examples/quickstart.py [LABELLED_FOLDER] [--out DIR]

LABELLED_FOLDER holds NORMAL/ and PNEUMONIA/ (or is a data set root with test/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pneumoscan

DEFAULT_DATA = Path("..") / "shared" / "data" / "site_sample"


def _fmt(value: float | None) -> str:
    """A metric with three decimals; ``None`` (undefined, e.g. one class only) as n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "data", nargs="?", type=Path, default=DEFAULT_DATA,
        help=f"labelled folder to evaluate (default: {DEFAULT_DATA})",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for heatmap.png")
    parser.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap resamples for the intervals"
    )
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"{args.data}: no such folder; give a folder with NORMAL/ and PNEUMONIA/")

    # 1. The shipped model, on its int8 ONNX export (no TensorFlow needed to predict).
    model = pneumoscan.load()
    print(model)

    # 2. One row per image: the values `pneumoscan predict` writes.
    table = model.predict(pneumoscan.samples())
    print(table)

    # 3. Where the model looked, for the first sample it calls pneumonia (loads Keras once).
    flagged = table[table["decision"] == "PNEUMONIA"]
    chosen = flagged["path"].iloc[0] if len(flagged) else table["path"].iloc[0]
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "heatmap.png"
    model.heatmap(chosen, out=target)
    print(f"heatmap of {Path(chosen).name} written to {target}")

    # 4. Metrics on a labelled folder, as `pneumoscan evaluate --json` writes them.
    metrics = pneumoscan.evaluate(model, args.data, n_resamples=args.bootstrap)
    low, high = metrics["auc_ci"]
    print(
        f"{args.data}: n={metrics['n']}, ROC AUC {_fmt(metrics['auc'])} "
        f"(95% CI {_fmt(low)}-{_fmt(high)}), sensitivity {_fmt(metrics['sensitivity'])}, "
        f"specificity {_fmt(metrics['specificity'])} at threshold {metrics['threshold']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
