"""Evaluate a model on a labelled folder: every figure with its uncertainty.

Scoring streams images in batches and keeps only one probability, label, patient id, subtype
and path per image (and P(viral) for a model with a subtype head), so memory does not grow
with the images held; the metrics are then pure functions of those columns
(:func:`pneumoscan.metrics.evaluation_metrics`, :func:`pneumoscan.metrics.subtype_metrics`).
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
from pneumoscan.inference.scorer import Scorer, forward_paths, subtype_head
from pneumoscan.metrics import (
    DEFAULT_RESAMPLES,
    evaluation_metrics,
    report_text,
    subtype_metrics,
)
from pneumoscan.models.subtype import (
    BACTERIAL,
    SUBTYPE_LABEL,
    SUBTYPE_TARGETS,
    SubtypeHead,
    subtype_targets,
)
from pneumoscan.progress import Reporter
from pneumoscan.train.site import calibration_sample_overlap

if TYPE_CHECKING:
    from pneumoscan.inference.scorer import AnyModel

#: Columns kept per scored image (plus ``p_viral`` for a model with a subtype head).
SCORED_COLUMNS = ["path", "label", "patient_id", "subtype"]
#: Which images the subtype figures are measured on, in words.
SUBTYPE_POPULATION = (
    "PNEUMONIA images whose file names name the cause (bacteria or virus), whatever the "
    "pneumonia decision: the figures measure the subtype head, not the pipeline (which gives "
    "an estimate only for images it decides PNEUMONIA)"
)


@dataclass
class ScoredImages:
    """The outcome of scoring one labelled split: a few columns per readable image.

    Attributes:
        table: ``path, label, patient_id, subtype`` of each scored image, in scoring order,
            and ``p_viral`` (calibrated P(viral)) when the model has a subtype head.
        p_pneumonia: P(pneumonia) per row of ``table``.
        skipped: Unreadable files with the reason.
        data: The dataset given.
        split: The split scored (``all`` for a bare class-folder root).
        model: Path of the model file.
        threshold: The model's operating threshold.
        model_sha256: SHA-256 of the model file that scored.
        backend: ``onnx`` or ``keras``.
        subtype: The model's bacterial-or-viral head, when it has one and the scoring file
            gives its estimate.
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
    subtype: SubtypeHead | None = None

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
) -> tuple[np.ndarray, np.ndarray | None, list[dict[str, str]]]:
    """P(pneumonia), and P(viral) for a model with a subtype head, for every row of a table,
    streaming; NaN for unreadable files.

    One :class:`~pneumoscan.inference.scorer.Scorer` for the whole table: both estimates come
    from the same forward pass, and a Keras model's feature network is built once.

    Returns:
        ``(p_pneumonia, p_viral, skipped)``: one score per row (``p_viral`` is ``None`` when
        the scoring file gives no subtype estimate) and the unreadable files with reasons.
    """
    reporter = reporter or Reporter(quiet=True)
    paths = table["path"].tolist()
    scorer = Scorer(loaded)
    with reporter.task(f"scoring ({loaded.name})", total=len(paths)) as advance:
        forward = forward_paths(scorer, paths, batch_size, advance)
    skipped: list[dict[str, str]] = []
    for position, message in forward.errors:
        skipped.append({"path": paths[position], "error": message})
        reporter.warn(f"skipped {message}")
    p_pneumonia = scorer.calibrate(forward.p_raw)
    p_viral = forward.p_viral
    return p_pneumonia, p_viral, skipped


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
    p_pneumonia, p_viral, skipped = score_table(loaded, table, batch_size, reporter)
    scored = ~np.isnan(p_pneumonia)
    if not scored.any():
        raise DatasetError(f"{data}: none of the {len(table)} images could be read")
    missing = empty_classes(table[scored].assign(error=""))
    if missing:
        reporter.warn(f"no {missing} images: AUC and the missing class's rates are undefined (NaN)")
    identity = model_identity(loaded)
    kept = table.loc[scored, SCORED_COLUMNS].reset_index(drop=True)
    if p_viral is not None:
        kept["p_viral"] = p_viral[scored]
    return ScoredImages(
        table=kept,
        p_pneumonia=p_pneumonia[scored],
        skipped=skipped,
        data=str(data),
        split=split,
        model=str(loaded.path),
        threshold=loaded.threshold,
        model_sha256=identity.model_sha256,
        backend=identity.backend,
        subtype=subtype_head(loaded) if p_viral is not None else None,
    )


def image_scores(scored: ScoredImages) -> list[dict[str, Any]]:
    """Every scored image as a record: ``path``, ``label``, ``p_pneumonia``, ``patient_id``
    (in scoring order), and ``p_viral`` for a model with a subtype head, so a JSON reader can
    redo any figure or look at single images."""
    table = scored.table
    p_viral = table["p_viral"] if "p_viral" in table else [None] * len(table)
    records = []
    for path, label, patient, p, viral in zip(
        table["path"], table["label"], table["patient_id"], scored.p_pneumonia, p_viral,
        strict=True,
    ):  # fmt: skip
        record = {
            "path": str(path),
            "label": str(label),
            "p_pneumonia": float(p),
            "patient_id": str(patient),
        }
        if viral is not None:
            record["p_viral"] = float(viral)
        records.append(record)
    return records


def named_pneumonias(table: pd.DataFrame) -> np.ndarray:
    """Rows of a scored table that the subtype figures count: PNEUMONIA images whose file
    name names the cause (``bacteria`` or ``virus``)."""
    pneumonia = (table["label"] == CLASSES[1]).to_numpy()
    return np.asarray(pneumonia & table["subtype"].isin(list(SUBTYPE_TARGETS)).to_numpy())


def subtype_summary(
    scored: ScoredImages, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> dict[str, Any] | None:
    """The subtype head's figures (:func:`pneumoscan.metrics.subtype_metrics`, bootstrap over
    patients) on every PNEUMONIA image whose file name names its cause, whatever the pneumonia
    decision, plus ``population``, ``label``, ``threshold_applies_to``, ``n_unnamed``
    (pneumonias of unnamed cause, left out), ``fitted_on`` (what the head's calibration was
    fitted on) and ``in_sample`` (``None`` here; :func:`flag_in_sample` sets it).

    Returns:
        ``None`` when the model gives no subtype estimate or no image names its cause.
    """
    table = scored.table
    if scored.subtype is None or "p_viral" not in table:
        return None
    pneumonia = (table["label"] == CLASSES[1]).to_numpy()
    named = named_pneumonias(table)
    if not named.any():
        return None
    is_viral, _ = subtype_targets(table["subtype"].to_numpy()[named])
    p_viral = table["p_viral"].to_numpy(dtype=float)[named]
    head = scored.subtype
    figures = subtype_metrics(
        is_viral,
        p_viral,
        np.array([head.call(p) == BACTERIAL for p in p_viral], dtype=bool),
        head.point.threshold,
        groups=table["patient_id"].to_numpy()[named],
        n_resamples=n_resamples,
        seed=seed,
    )
    return figures | {
        "population": SUBTYPE_POPULATION,
        "label": SUBTYPE_LABEL,
        "threshold_applies_to": "P(bacterial) = 1 - P(viral)",
        "n_unnamed": int((pneumonia & ~named).sum()),
        "fitted_on": head.point.fitted_on,
        "in_sample": None,
    }


def summarise(
    scored: ScoredImages, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED
) -> dict[str, Any]:
    """The metrics of scored images: :func:`pneumoscan.metrics.evaluation_metrics` (bootstrap
    over patients) plus ``model``, ``data``, ``split``, ``report`` (text) and ``skipped``, and
    ``subtype`` (:func:`subtype_summary`) when the model's subtype estimate can be measured."""
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
    subtype = subtype_summary(scored, n_resamples, seed)
    return (
        metrics
        | ({} if subtype is None else {"subtype": subtype})
        | {
            "model": scored.model,
            "model_sha256": scored.model_sha256,
            "backend": scored.backend,
            "pneumoscan_version": __version__,
            "data": scored.data,
            "split": scored.split,
            "report": report_text(y_true, scored.p_pneumonia, scored.threshold),
            "skipped": scored.skipped,
        }
    )


def flag_calibration_sample(
    metadata: dict[str, Any], scored: ScoredImages, reporter: Reporter | None
) -> dict[str, Any] | None:
    """A site-calibrated model scored on its own calibration images gives in-sample figures:
    :func:`pneumoscan.train.site.calibration_sample_overlap`, warned about once."""
    found = calibration_sample_overlap(metadata, scored.table["path"].tolist())
    if found and reporter is not None:
        reporter.warn(found["warning"])
    return found


def subtype_in_sample(
    scored: ScoredImages, calibration_sample: dict[str, Any] | None
) -> str | None:
    """Why the subtype figures are in-sample, or ``None``: they are when these images are the
    ones its calibration and threshold were fitted on (the model's validation split, or the
    site-calibration sample of a head calibrated at the site).

    Args:
        scored: The scored images (their split and the model's head).
        calibration_sample: :func:`flag_calibration_sample`'s finding.
    """
    head = scored.subtype
    if head is None:
        return None
    fitted = "the subtype head's calibration and threshold were fitted on them"
    if scored.split == "val" and not head.point.site_calibrated:
        return (
            f"these are the model's own validation pneumonias and {fitted}: the subtype "
            "figures are in-sample and optimistic"
        )
    if calibration_sample and head.point.site_calibrated:
        return (
            f"{calibration_sample['overlap']} of {calibration_sample['n']} images are this "
            f"model's site-calibration sample and {fitted}: the subtype figures are in-sample "
            "and optimistic"
        )
    return None


def flag_in_sample(
    metrics: dict[str, Any],
    metadata: dict[str, Any],
    scored: ScoredImages,
    reporter: Reporter | None,
) -> None:
    """Set ``calibration_sample`` (:func:`flag_calibration_sample`) and the subtype block's
    ``in_sample`` (:func:`subtype_in_sample`) in ``metrics``."""
    metrics["calibration_sample"] = flag_calibration_sample(metadata, scored, reporter)
    if "subtype" in metrics:
        metrics["subtype"]["in_sample"] = subtype_in_sample(scored, metrics["calibration_sample"])


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
        (:func:`pneumoscan.train.site.calibration_sample_overlap`; else ``None``). For a model
        with a subtype head on images whose file names name the cause, ``subtype``
        (:func:`subtype_summary`), its ``in_sample`` set by :func:`subtype_in_sample`.

    Raises:
        DatasetError: No readable labelled image is left.
    """
    loaded = (model if isinstance(model, Predictor) else Predictor.open(model)).model
    scored = score_images(data, loaded, split, batch_size, reporter)
    metrics = summarise(scored, n_resamples, seed) | {"scores": image_scores(scored)}
    flag_in_sample(metrics, loaded.metadata, scored, reporter)
    if plot_path is not None:
        from pneumoscan.plots import plot_confusion_matrix  # lazy: loads matplotlib

        title = (
            f"Confusion matrix, {Path(data).name} (n={metrics['n']}, "
            f"threshold {format_threshold(loaded.threshold)})"
        )
        plot_confusion_matrix(np.array(metrics["confusion_matrix"]), plot_path, title=title)
    return metrics
