"""Evaluate a model on a labelled folder: every figure with its uncertainty.

Scoring streams images in batches and keeps only one probability, label, patient id, subtype
and path per image, so memory does not grow with the images held; the metrics are then pure
functions of those columns (:func:`pneumoscan.metrics.evaluation_metrics`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pneumoscan.constants import CLASSES, DEFAULT_SEED
from pneumoscan.constants import VERSION as __version__
from pneumoscan.data.dataset import (
    empty_classes,
    scan_dataset,
    select_split,
    source_from_name,
)
from pneumoscan.errors import DatasetError
from pneumoscan.formatting import format_threshold
from pneumoscan.inference.predict import model_identity
from pneumoscan.inference.predictor import Predictor
from pneumoscan.inference.scorer import score_files
from pneumoscan.metrics import DEFAULT_RESAMPLES, evaluation_metrics, report_text
from pneumoscan.progress import Reporter
from pneumoscan.train.site import calibration_sample_overlap

if TYPE_CHECKING:
    from pneumoscan.inference.scorer import AnyModel

#: Columns kept per scored image.
SCORED_COLUMNS = ["path", "label", "patient_id", "subtype"]


@dataclass
class ScoredImages:
    """The outcome of scoring one labelled split: a few columns per readable image.

    Attributes:
        table: ``path, label, patient_id, subtype`` of each scored image, in scoring order.
        p_pneumonia: P(pneumonia) per row of ``table``.
        skipped: Unreadable files with the reason.
        data: The dataset given.
        split: The split scored (``all`` for a bare class-folder root).
        model: Path of the model file.
        threshold: The model's operating threshold.
        model_sha256: SHA-256 of the model file that scored.
        backend: ``onnx`` or ``keras``.
    """

    table: pd.DataFrame
    p_pneumonia: np.ndarray
    skipped: list[dict[str, str]]
    data: str
    split: str
    model: str
    threshold: float
    model_sha256: str | None = None
    backend: str | None = None

    @property
    def y_true(self) -> np.ndarray:
        """1 for PNEUMONIA, 0 for NORMAL."""
        return (self.table["label"] == CLASSES[1]).to_numpy().astype(int)


def split_name(table: pd.DataFrame, split: str) -> str:
    """The split actually used: ``all`` for a bare class-folder root, else ``split``."""
    return "all" if set(table["split"]) == {"all"} else split


def score_table(
    loaded: AnyModel,
    table: pd.DataFrame,
    batch_size: int = 32,
    reporter: Reporter | None = None,
) -> tuple[np.ndarray, list[dict[str, str]]]:
    """P(pneumonia) for every row of a table, streaming; NaN for unreadable files.

    Returns:
        ``(p_pneumonia, skipped)``: one score per row and the unreadable files with reasons.
    """
    reporter = reporter or Reporter(quiet=True)
    paths = table["path"].tolist()
    p_pneumonia = np.full(len(paths), np.nan)
    skipped: list[dict[str, str]] = []
    with reporter.task(f"scoring ({loaded.name})", total=len(paths)) as advance:
        for score in score_files(loaded, paths, batch_size=batch_size):
            if score.probability is None:
                skipped.append({"path": score.path, "error": str(score.error)})
                reporter.warn(f"skipped {score.error}")
            else:
                p_pneumonia[score.position] = score.probability
            advance(1)
    return p_pneumonia, skipped


def score_images(
    data: str | Path,
    loaded: AnyModel,
    split: str = "test",
    batch_size: int = 32,
    reporter: Reporter | None = None,
    table: pd.DataFrame | None = None,
) -> ScoredImages:
    """Score the readable images of one split of a labelled dataset.

    Args:
        data: Dataset root or a folder with ``NORMAL/`` and ``PNEUMONIA/``.
        loaded: The model.
        split: Split to score; ``val`` re-creates the model's own validation split.
        batch_size: Images decoded and scored at a time.
        reporter: Progress and warnings sink.
        table: The rows to score (default: :func:`select_split` of ``data``); a comparison
            passes one table to both models so they see the same images.

    Raises:
        DatasetError: No readable labelled image is left.
    """
    reporter = reporter or Reporter(quiet=True)
    if table is None:
        scanned = scan_dataset(data)
        table = select_split(scanned, split, loaded.metadata)
        split = split_name(scanned, split)
    p_pneumonia, skipped = score_table(loaded, table, batch_size, reporter)
    scored = ~np.isnan(p_pneumonia)
    if not scored.any():
        raise DatasetError(f"{data}: none of the {len(table)} images could be read")
    missing = empty_classes(table[scored].assign(error=""))
    if missing:
        reporter.warn(f"no {missing} images: AUC and the missing class's rates are undefined (NaN)")
    identity = model_identity(loaded)
    return ScoredImages(
        table=table.loc[scored, SCORED_COLUMNS].reset_index(drop=True),
        p_pneumonia=p_pneumonia[scored],
        skipped=skipped,
        data=str(data),
        split=split,
        model=str(loaded.path),
        threshold=loaded.threshold,
        model_sha256=identity.model_sha256,
        backend=identity.backend,
    )


def image_scores(scored: ScoredImages) -> list[dict[str, Any]]:
    """Every scored image as a record: ``path``, ``label``, ``p_pneumonia``, ``patient_id``
    (in scoring order), so a JSON reader can redo any figure or look at single images."""
    return [
        {
            "path": str(path),
            "label": str(label),
            "p_pneumonia": float(p),
            "patient_id": str(patient),
        }
        for path, label, patient, p in zip(
            scored.table["path"],
            scored.table["label"],
            scored.table["patient_id"],
            scored.p_pneumonia,
            strict=True,
        )
    ]


def summarise(
    scored: ScoredImages, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> dict[str, Any]:
    """The metrics of scored images: :func:`pneumoscan.metrics.evaluation_metrics` (bootstrap
    over patients) plus ``model``, ``data``, ``split``, ``report`` (text) and ``skipped``."""
    y_true = scored.y_true
    metrics = evaluation_metrics(
        y_true,
        scored.p_pneumonia,
        scored.threshold,
        groups=scored.table["patient_id"].to_numpy(),
        subtypes=scored.table["subtype"].to_numpy(),
        n_resamples=n_resamples,
        seed=seed,
        sources=[source_from_name(Path(path).name) for path in scored.table["path"]],
    )
    return metrics | {
        "model": scored.model,
        "model_sha256": scored.model_sha256,
        "backend": scored.backend,
        "pneumoscan_version": __version__,
        "data": scored.data,
        "split": scored.split,
        "report": report_text(y_true, scored.p_pneumonia, scored.threshold),
        "skipped": scored.skipped,
    }


def flag_calibration_sample(
    metadata: dict[str, Any], scored: ScoredImages, reporter: Reporter | None
) -> dict[str, Any] | None:
    """A site-calibrated model scored on its own calibration images gives in-sample figures:
    :func:`pneumoscan.train.site.calibration_sample_overlap`, warned about once."""
    found = calibration_sample_overlap(metadata, scored.table["path"].tolist())
    if found and reporter is not None:
        reporter.warn(found["warning"])
    return found


def evaluate(
    data: str | Path,
    model: str | Path | Predictor | None = None,
    split: str = "test",
    batch_size: int = 32,
    plot_path: str | Path | None = None,
    reporter: Reporter | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Score every readable image of a labelled folder with a model, streaming in batches.

    Args:
        data: Dataset root or a folder with ``NORMAL/`` and ``PNEUMONIA/``.
        model: Model file, run folder or ``.onnx`` export; the shipped model when ``None``.
            It is opened as ``pneumoscan predict`` opens it (:meth:`Predictor.open
            <pneumoscan.inference.predictor.Predictor.open>`): the figures are those of the
            file that scores (the shipped model's int8 export by default). An open
            :class:`~pneumoscan.inference.predictor.Predictor` is used as it is (the API).
        split: Split to evaluate for a dataset root.
        batch_size: Images decoded and scored at a time (memory does not grow with ``n``).
        plot_path: Where to write the confusion-matrix heatmap (skipped when ``None``).
        reporter: Progress and warnings sink.
        n_resamples: Bootstrap resamples (over patients) for the AUC, PR AUC and F1 intervals.
        seed: Bootstrap seed.

    Returns:
        See :func:`summarise`, plus ``scores``: every image's record (:func:`image_scores`),
        and ``calibration_sample``: for a site-calibrated model scored on images of its own
        calibration sample, how many and the cross-validated figures to expect instead
        (:func:`pneumoscan.train.site.calibration_sample_overlap`; else ``None``).

    Raises:
        DatasetError: No readable labelled image is left.
    """
    loaded = (model if isinstance(model, Predictor) else Predictor.open(model)).model
    scored = score_images(data, loaded, split, batch_size, reporter)
    metrics = summarise(scored, n_resamples, seed) | {"scores": image_scores(scored)}
    metrics["calibration_sample"] = flag_calibration_sample(loaded.metadata, scored, reporter)
    if plot_path is not None:
        from pneumoscan.plots import plot_confusion_matrix  # lazy: loads matplotlib

        title = (
            f"Confusion matrix, {Path(data).name} (n={metrics['n']}, "
            f"threshold {format_threshold(loaded.threshold)})"
        )
        plot_confusion_matrix(np.array(metrics["confusion_matrix"]), plot_path, title=title)
    return metrics
