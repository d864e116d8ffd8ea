"""Evaluate a model on a labelled folder: classification report, confusion matrix, ROC AUC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pneumoscan.constants import CLASSES
from pneumoscan.data import assign_validation_split, empty_classes, scan_dataset
from pneumoscan.errors import DatasetError
from pneumoscan.metrics import binary_metrics, report_text
from pneumoscan.progress import Reporter


def select_split(
    table: pd.DataFrame, split: str, model_metadata: dict[str, Any] | None = None
) -> pd.DataFrame:
    """Rows of ``split``; a bare class-folder root (split ``all``) is used whole.

    ``val`` on a dataset whose ``val/`` folder is missing or tiny re-creates the
    patient-grouped validation split the model was trained with (same fraction and seed,
    as recorded in its metadata), so a model can be scored on its own held-out patients.

    Raises:
        DatasetError: The split is absent; the message lists the splits present.
    """
    if set(table["split"]) == {"all"}:
        return table
    if split == "val" and model_metadata and "split" in model_metadata.get("data", {}):
        recorded = model_metadata["data"]["split"]
        table = assign_validation_split(table, recorded["val_fraction"], recorded["seed"])
    chosen = table[table["split"] == split]
    if chosen.empty:
        present = sorted(set(table["split"]))
        raise DatasetError(
            f"no images in split {split!r}; this dataset has {present} (use --split)"
        )
    return chosen.reset_index(drop=True)


def evaluate(
    data: str | Path,
    model: str | Path | None = None,
    split: str = "test",
    batch_size: int = 32,
    plot_path: str | Path | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Score every readable image of a labelled folder with a model, streaming in batches.

    Args:
        data: Dataset root or a folder with ``NORMAL/`` and ``PNEUMONIA/``.
        model: Model file or run folder; the shipped model when ``None``.
        split: Split to evaluate for a dataset root.
        batch_size: Images decoded and scored at a time (memory does not grow with ``n``).
        plot_path: Where to write the confusion-matrix heatmap (skipped when ``None``).
        reporter: Progress and warnings sink.

    Returns:
        The metrics of :func:`pneumoscan.metrics.binary_metrics` plus ``model``, ``data``,
        ``split``, ``report`` (text) and ``skipped`` (unreadable files with reasons).

    Raises:
        DatasetError: No readable labelled image is left.
    """
    from pneumoscan.inference import score_files
    from pneumoscan.modelfile import load_model

    reporter = reporter or Reporter(quiet=True)
    loaded = load_model(model)
    table = select_split(scan_dataset(data), split, loaded.metadata)
    paths = table["path"].tolist()
    p_pneumonia = np.full(len(paths), np.nan)
    skipped: list[dict[str, str]] = []
    with reporter.task("scoring", total=len(paths)) as advance:
        for score in score_files(loaded, paths, batch_size=batch_size):
            if score.probability is None:
                skipped.append({"path": score.path, "error": str(score.error)})
                reporter.warn(f"skipped {score.error}")
            else:
                p_pneumonia[score.position] = score.probability
            advance(1)
    scored = ~np.isnan(p_pneumonia)
    if not scored.any():
        raise DatasetError(f"{data}: none of the {len(paths)} images could be read")
    missing = empty_classes(table[scored].assign(error=""))
    if missing:
        reporter.warn(f"no {missing} images: AUC and the missing class's rates are undefined (NaN)")
    y_true = (table["label"] == CLASSES[1]).to_numpy().astype(int)[scored]
    threshold = loaded.threshold
    metrics = binary_metrics(y_true, p_pneumonia[scored], threshold)
    metrics |= {
        "model": str(loaded.path),
        "data": str(data),
        "split": split if set(table["split"]) != {"all"} else "all",
        "report": report_text(y_true, p_pneumonia[scored], threshold),
        "skipped": skipped,
    }
    if plot_path is not None:
        from pneumoscan.plots import plot_confusion_matrix

        title = f"Confusion matrix, {Path(data).name} (n={metrics['n']}, threshold {threshold:.2f})"
        plot_confusion_matrix(np.array(metrics["confusion_matrix"]), plot_path, title=title)
    return metrics
