"""Classification metrics as small pure functions (scikit-learn underneath).

Labels are 1 for PNEUMONIA (positive) and 0 for NORMAL; scores are P(pneumonia).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import norm
from sklearn.metrics import brier_score_loss, classification_report, confusion_matrix, roc_auc_score

from pneumoscan.constants import CLASSES


def predict_labels(p_pneumonia: np.ndarray, threshold: float) -> np.ndarray:
    """1 where ``p_pneumonia >= threshold``, else 0."""
    return (np.asarray(p_pneumonia) >= threshold).astype(int)


def safe_roc_auc(y_true: np.ndarray, p_pneumonia: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present (AUC is undefined then)."""
    y_true = np.asarray(y_true)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(roc_auc_score(y_true, p_pneumonia))


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else float("nan")


def binary_metrics(y_true: np.ndarray, p_pneumonia: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion matrix and the rates a clinician reads, at one threshold.

    Args:
        y_true: 0/1 labels.
        p_pneumonia: Scores in [0, 1].
        threshold: Decision threshold (PNEUMONIA when score >= threshold).

    Returns:
        ``n``, ``auc``, ``accuracy``, ``sensitivity`` (recall of PNEUMONIA), ``specificity``
        (recall of NORMAL), ``precision`` (PPV), ``npv``, ``threshold`` and
        ``confusion_matrix`` as ``[[tn, fp], [fn, tp]]``. Undefined rates are NaN.
    """
    y_true = np.asarray(y_true).astype(int)
    y_pred = predict_labels(p_pneumonia, threshold)
    matrix = confusion_matrix(y_true, y_pred, labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in matrix.ravel())
    return {
        "n": len(y_true),
        "auc": safe_roc_auc(y_true, p_pneumonia),
        "accuracy": _ratio(tp + tn, len(y_true)),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "threshold": float(threshold),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def report_text(y_true: np.ndarray, p_pneumonia: np.ndarray, threshold: float) -> str:
    """scikit-learn's per-class precision/recall/F1/support table, as the notebook printed it."""
    return str(
        classification_report(
            np.asarray(y_true).astype(int),
            predict_labels(p_pneumonia, threshold),
            labels=[0, 1],
            target_names=list(CLASSES),
            digits=3,
            zero_division=0,
        )
    )


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (well-behaved near 0 and 1, unlike the normal one).

    Returns:
        ``(low, high)``; ``(nan, nan)`` when ``total`` is 0.
    """
    if total == 0:
        return float("nan"), float("nan")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / total
    denominator = 1 + z**2 / total
    centre = (p + z**2 / (2 * total)) / denominator
    half = z * np.sqrt(p * (1 - p) / total + z**2 / (4 * total**2)) / denominator
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def expected_calibration_error(
    y_true: np.ndarray, p_pneumonia: np.ndarray, bins: int = 10
) -> float:
    """ECE: the image-weighted mean gap between predicted P(pneumonia) and the observed
    pneumonia rate, over ``bins`` equal-width probability bins."""
    y_true = np.asarray(y_true, dtype=float)
    p_pneumonia = np.asarray(p_pneumonia, dtype=float)
    if len(y_true) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p_pneumonia, edges[1:-1], right=True), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap += members.sum() * abs(p_pneumonia[members].mean() - y_true[members].mean())
    return float(gap / len(y_true))


def brier_score(y_true: np.ndarray, p_pneumonia: np.ndarray) -> float:
    """Mean squared error of P(pneumonia) against the 0/1 label."""
    return float(brier_score_loss(np.asarray(y_true).astype(int), p_pneumonia, pos_label=1))
