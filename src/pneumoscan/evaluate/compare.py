"""Paired comparison of two models on the same images: is one really better?

Both models score the same images; the difference in ROC AUC gets a paired bootstrap interval
(the same patients resampled for both models), so the variation shared by the two models
cancels and only their disagreement is left. On a few hundred images a difference of a point
or two is usually inside that interval: the verdict then says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.constants import DEFAULT_SEED
from pneumoscan.data.dataset import scan_dataset, select_split
from pneumoscan.errors import DatasetError
from pneumoscan.evaluate.scoring import score_images, split_name
from pneumoscan.inference.backends import load_any_model
from pneumoscan.metrics import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    paired_auc_difference,
    rates_with_intervals,
    sensitivity_by_subtype,
)
from pneumoscan.models.modelfile import resolve_model_path
from pneumoscan.progress import Reporter


def verdict(comparison: dict[str, Any], name_a: str = "A", name_b: str = "B") -> str:
    """A plain-language verdict on an AUC difference (B - A) and its interval.

    Args:
        comparison: Output of :func:`pneumoscan.metrics.paired_auc_difference`.
        name_a: Label of model A.
        name_b: Label of model B.
    """
    low, high = comparison["ci"]
    level = f"{100 * comparison['confidence']:.0f}%"
    if math.isnan(low) or math.isnan(high):
        return "undefined: the images do not contain both classes, so AUC cannot be compared"
    interval = f"difference {comparison['difference']:+.3f}, {level} CI {low:+.3f} to {high:+.3f}"
    if low <= 0 <= high:
        return f"no significant difference in ROC AUC between {name_a} and {name_b} ({interval})"
    better, worse = (name_b, name_a) if low > 0 else (name_a, name_b)
    return f"{better} has a higher ROC AUC than {worse} ({interval})"


def _same_split_recorded(metadata_a: dict[str, Any], metadata_b: dict[str, Any]) -> bool:
    split_a = metadata_a.get("data", {}).get("split", {})
    split_b = metadata_b.get("data", {}).get("split", {})
    keys = ("seed", "val_fraction")
    return all(split_a.get(k) == split_b.get(k) for k in keys)


def compare_models(
    model_a: str | Path | None,
    model_b: str | Path | None,
    data: str | Path,
    split: str = "test",
    batch_size: int = 32,
    reporter: Reporter | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """Score two models on the same images and compare their ROC AUC, paired.

    ``--split val`` re-creates model A's validation split; when model B recorded another split,
    some of those images may be B's training images, and a warning says so.

    Args:
        model_a: Model file, run folder or ``.onnx`` export (``None``: the shipped model).
        model_b: Model file, run folder or ``.onnx`` export (``None``: the shipped model).
        data: Dataset root or a folder with ``NORMAL/`` and ``PNEUMONIA/``.
        split: Split to compare on.
        batch_size: Images scored at a time.
        reporter: Progress and warnings sink.
        n_resamples: Paired bootstrap resamples (over patients).
        seed: Bootstrap seed.
        confidence: Coverage of the interval.

    Returns:
        ``model_a``, ``model_b``, ``data``, ``split``, ``n``, ``n_patients``, per model
        (``a``, ``b``) its ``auc``, ``threshold``, ``sensitivity`` and ``specificity`` with
        Wilson intervals and ``per_subtype`` sensitivity (``bacteria``, ``virus``), the
        :func:`~pneumoscan.metrics.paired_auc_difference` fields under ``auc_difference``,
        ``verdict`` and ``skipped``.

    Raises:
        DatasetError: No image readable by both models.
    """
    reporter = reporter or Reporter(quiet=True)
    path_a, path_b = resolve_model_path(model_a), resolve_model_path(model_b)
    loaded_a = load_any_model(path_a)
    # A model compared with itself is loaded and scored once (its difference is exactly 0).
    same = path_a.resolve() == path_b.resolve()
    loaded_b = loaded_a if same else load_any_model(path_b)
    scanned = scan_dataset(data)
    table = select_split(scanned, split, loaded_a.metadata)
    split = split_name(scanned, split)
    if split == "val" and not _same_split_recorded(loaded_a.metadata, loaded_b.metadata):
        reporter.warn(
            "model B recorded another validation split than model A: some of these images may "
            "be model B's training images, which would flatter it"
        )
    scored_a = score_images(data, loaded_a, split, batch_size, reporter, table=table)
    # Model B scores exactly the images model A could read, so the comparison is paired.
    scored_b = (
        scored_a
        if same
        else score_images(data, loaded_b, split, batch_size, reporter, table=scored_a.table)
    )
    if len(scored_b.table) != len(scored_a.table):
        raise DatasetError("model B could not read images model A read; no paired comparison")
    y_true = scored_a.y_true
    groups = scored_a.table["patient_id"].to_numpy()
    difference = paired_auc_difference(
        y_true, scored_a.p_pneumonia, scored_b.p_pneumonia, groups, n_resamples, seed, confidence
    )
    name_a, name_b = _labels(loaded_a.path, loaded_b.path)
    subtypes = scored_a.table["subtype"].to_numpy()
    per_model = {
        key: _model_summary(y_true, scored.p_pneumonia, scored.threshold, auc, auc_ci, confidence)
        | {
            "per_subtype": sensitivity_by_subtype(
                y_true, scored.p_pneumonia, subtypes, scored.threshold, confidence
            )
        }
        for key, scored, auc, auc_ci in (
            ("a", scored_a, difference["auc_a"], difference["auc_a_ci"]),
            ("b", scored_b, difference["auc_b"], difference["auc_b_ci"]),
        )
    }
    return {
        "model_a": str(loaded_a.path),
        "model_b": str(loaded_b.path),
        "name_a": name_a,
        "name_b": name_b,
        "data": str(data),
        "split": split,
        "n": len(y_true),
        "n_patients": len(np.unique(groups)),
        **per_model,
        "auc_difference": difference,
        "verdict": verdict(difference, name_a, name_b),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed, "unit": "patient"},
        "skipped": scored_a.skipped,
    }


def _model_summary(
    y_true: np.ndarray,
    p_pneumonia: np.ndarray,
    threshold: float,
    auc: float,
    auc_ci: list[float],
    confidence: float,
) -> dict[str, Any]:
    rates = rates_with_intervals(y_true, p_pneumonia, threshold, confidence)
    return {
        "auc": auc,
        "auc_ci": auc_ci,
        "threshold": threshold,
        "sensitivity": rates["sensitivity"]["value"],
        "sensitivity_ci": rates["sensitivity"]["ci"],
        "specificity": rates["specificity"]["value"],
        "specificity_ci": rates["specificity"]["ci"],
    }


def _labels(path_a: Path, path_b: Path) -> tuple[str, str]:
    """Short names for the two models: ``A (file)`` and ``B (file)``; run folders name a
    ``model.keras``, so the folder's name is used then."""

    def short(path: Path) -> str:
        return path.parent.name if path.name == "model.keras" else path.name

    return f"A ({short(path_a)})", f"B ({short(path_b)})"
