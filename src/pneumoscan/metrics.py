"""Classification metrics as small pure functions (scikit-learn underneath).

Labels are 1 for PNEUMONIA (positive) and 0 for NORMAL; scores are P(pneumonia).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    classification_report,
    confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from pneumoscan.constants import CLASSES, DEFAULT_RESAMPLES, DEFAULT_SEED


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
    tn, fp, fn, tp = confusion_counts(y_true, p_pneumonia, threshold)
    rates = {name: _ratio(k, total) for name, (k, total) in rate_fractions(tn, fp, fn, tp).items()}
    return {
        "n": len(y_true),
        "auc": safe_roc_auc(y_true, p_pneumonia),
        "accuracy": rates["accuracy"],
        "sensitivity": rates["sensitivity"],
        "specificity": rates["specificity"],
        "precision": rates["ppv"],
        "npv": rates["npv"],
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
    ci = binomtest(successes, total).proportion_ci(confidence_level=confidence, method="wilson")
    return float(max(0.0, ci.low)), float(min(1.0, ci.high))


def _bin_index(p_pneumonia: np.ndarray, bins: int) -> np.ndarray:
    """Bin of each score among ``bins`` equal-width bins, closed on the right: (0.1, 0.2]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return np.clip(np.digitize(p_pneumonia, edges[1:-1], right=True), 0, bins - 1)


def expected_calibration_error(
    y_true: np.ndarray, p_pneumonia: np.ndarray, bins: int = 10
) -> float:
    """ECE: the image-weighted mean gap between predicted P(pneumonia) and the observed
    pneumonia rate, over ``bins`` equal-width probability bins."""
    y_true = np.asarray(y_true, dtype=float)
    p_pneumonia = np.asarray(p_pneumonia, dtype=float)
    if len(y_true) == 0:
        return float("nan")
    which = _bin_index(p_pneumonia, bins)
    gap = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap += members.sum() * abs(p_pneumonia[members].mean() - y_true[members].mean())
    return float(gap / len(y_true))


def brier_score(y_true: np.ndarray, p_pneumonia: np.ndarray) -> float:
    """Mean squared error of P(pneumonia) against the 0/1 label."""
    return float(brier_score_loss(np.asarray(y_true).astype(int), p_pneumonia, pos_label=1))


# --- Uncertainty, calibration and operating-point tables -------------------------------------

DEFAULT_CONFIDENCE = 0.95
CALIBRATION_BINS = 10
#: Thresholds of the sweep table (the operating threshold is added to them).
SWEEP_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))
#: Resample x image cells per block of the bootstrap: bounds memory whatever ``n`` is.
_BLOCK_CELLS = 1_000_000

#: A statistic evaluated on many weighted resamples at once: ``(y, score, weights[k, n]) -> (k,)``.
WeightedStatistic = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def confusion_counts(
    y_true: np.ndarray, p_pneumonia: np.ndarray, threshold: float
) -> tuple[int, int, int, int]:
    """``(tn, fp, fn, tp)`` at ``threshold`` (PNEUMONIA when score >= threshold)."""
    matrix = confusion_matrix(
        np.asarray(y_true).astype(int), predict_labels(p_pneumonia, threshold), labels=[0, 1]
    )
    tn, fp, fn, tp = (int(v) for v in matrix.ravel())
    return tn, fp, fn, tp


def rate_fractions(tn: int, fp: int, fn: int, tp: int) -> dict[str, tuple[int, int]]:
    """Each rate a clinician reads as ``(successes, total)``: the one place sensitivity,
    specificity, PPV, NPV and accuracy are defined from the confusion counts."""
    return {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
        "accuracy": (tp + tn, tp + tn + fp + fn),
    }


def operating_rates(
    y_true: np.ndarray, p_pneumonia: np.ndarray, threshold: float
) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV and accuracy at one threshold (NaN when undefined),
    from :func:`confusion_counts` and :func:`rate_fractions`."""
    counts = confusion_counts(y_true, p_pneumonia, threshold)
    return {name: _ratio(k, total) for name, (k, total) in rate_fractions(*counts).items()}


def safe_average_precision(y_true: np.ndarray, p_pneumonia: np.ndarray) -> float:
    """Area under the precision-recall curve (average precision), NaN without both classes."""
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(average_precision_score(y_true, p_pneumonia))


def _tie_groups(
    y_true: np.ndarray, score: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct score (ascending), the summed weights of positives and of negatives.

    Returns:
        ``(positive, negative)``, each ``(k, distinct scores)``.
    """
    order = np.argsort(score, kind="mergesort")
    sorted_score = np.asarray(score)[order]
    positive = np.asarray(y_true)[order].astype(bool)
    block = weights[:, order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    return (
        np.add.reduceat(block * positive, starts, axis=1),
        np.add.reduceat(block * ~positive, starts, axis=1),
    )


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio, NaN where the denominator is 0 (an undefined rate)."""
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, numerator / safe, np.nan)


def weighted_roc_auc(y_true: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``weights`` (image weights, e.g. bootstrap counts), vectorised.

    The Mann-Whitney form: the weighted share of (positive, negative) pairs ranked correctly,
    ties counting one half; equal to ``roc_auc_score(..., sample_weight=row)`` for every row.

    Args:
        y_true: 0/1 labels, ``(n,)``.
        score: Scores, ``(n,)``.
        weights: Non-negative weights, ``(k, n)``.

    Returns:
        ``(k,)`` AUCs; NaN for a row whose weights leave only one class.
    """
    positive, negative = _tie_groups(y_true, score, np.atleast_2d(weights))
    negatives_below = np.cumsum(negative, axis=1) - negative
    correct = (positive * (negatives_below + 0.5 * negative)).sum(axis=1)
    return _divide(correct, positive.sum(axis=1) * negative.sum(axis=1))


def weighted_average_precision(
    y_true: np.ndarray, score: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Average precision (PR AUC) of each row of ``weights``, vectorised.

    The step-wise sum of scikit-learn's ``average_precision_score``: over distinct thresholds
    from the highest score down, (gain in recall) x (precision at that threshold).

    Returns:
        ``(k,)`` values; NaN for a row without positive weight.
    """
    positive, negative = _tie_groups(y_true, score, np.atleast_2d(weights))
    true_pos = np.cumsum(positive[:, ::-1], axis=1)
    flagged = true_pos + np.cumsum(negative[:, ::-1], axis=1)
    # Where nothing is flagged yet the recall gain is 0 too, so precision 0 changes nothing.
    precision = np.where(flagged > 0, true_pos / np.where(flagged > 0, flagged, 1.0), 0.0)
    recall_gain = positive[:, ::-1]
    return _divide((recall_gain * precision).sum(axis=1), positive.sum(axis=1))


def weighted_f1(threshold: float) -> WeightedStatistic:
    """F1 of PNEUMONIA at ``threshold`` as a weighted, vectorised statistic."""

    def statistic(y_true: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
        weights = np.atleast_2d(weights)
        positive = np.asarray(y_true).astype(bool)
        flagged = np.asarray(score) >= threshold
        tp = (weights * (positive & flagged)).sum(axis=1)
        errors = (weights * (positive != flagged)).sum(axis=1)
        return _divide(2 * tp, 2 * tp + errors)

    return statistic


def _resample_units(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, int]:
    """Index of each image's resampling unit (its patient, else itself) and the unit count."""
    if groups is None:
        return np.arange(n), n
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    return inverse.ravel(), int(inverse.max()) + 1 if n else 0


def bootstrap_weight_blocks(
    groups: np.ndarray | None, n: int, n_resamples: int, seed: int
) -> Iterator[np.ndarray]:
    """Bootstrap resamples as image weights, in blocks of rows to bound memory.

    Each resample draws as many units as there are, with replacement; a unit is a patient when
    ``groups`` (patient ids) is given, else an image. An image's weight is the number of times
    its unit was drawn, so all images of a patient enter or leave a resample together.

    Args:
        groups: Patient id per image, or ``None`` to resample images.
        n: Number of images.
        n_resamples: Total rows yielded.
        seed: Seed of the generator (same seed, same resamples).

    Yields:
        Float arrays ``(rows, n)``, the rows adding up to ``n_resamples``.
    """
    unit, n_units = _resample_units(groups, n)
    rng = np.random.default_rng(seed)
    rows = max(1, _BLOCK_CELLS // max(n, 1))
    uniform = np.full(n_units, 1.0 / n_units)
    for start in range(0, n_resamples, rows):
        counts = rng.multinomial(n_units, uniform, size=min(rows, n_resamples - start))
        yield counts[:, unit].astype(float)


def bootstrap_replicates(
    y_true: np.ndarray,
    scores: Sequence[np.ndarray],
    statistics: Sequence[WeightedStatistic],
    groups: np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """Statistics on the same bootstrap resamples for each of several score vectors.

    Sharing the resamples between score vectors (two models on the same images) makes the
    comparison paired: each resample's difference is between the models, not the samples.

    Args:
        y_true: 0/1 labels.
        scores: Score vectors, each aligned with ``y_true``.
        statistics: Weighted statistics, e.g. :func:`weighted_roc_auc`.
        groups: Patient id per image (resample patients), or ``None`` (resample images).
        n_resamples: Number of resamples.
        seed: Seed of the resamples.

    Returns:
        ``(len(scores), len(statistics), n_resamples)`` replicates, NaN where a statistic is
        undefined (a resample with one class only).
    """
    y_true = np.asarray(y_true).astype(int)
    vectors = [np.asarray(s, dtype=float) for s in scores]
    blocks = [
        np.array([[statistic(y_true, v, weights) for statistic in statistics] for v in vectors])
        for weights in bootstrap_weight_blocks(groups, len(y_true), n_resamples, seed)
    ]
    return np.concatenate(blocks, axis=2)


def percentile_interval(
    replicates: np.ndarray, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """Percentile bootstrap interval, ignoring undefined (NaN) replicates."""
    defined = replicates[~np.isnan(replicates)]
    if defined.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


def rates_with_intervals(
    y_true: np.ndarray,
    p_pneumonia: np.ndarray,
    threshold: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, dict[str, Any]]:
    """Sensitivity, specificity, PPV, NPV and accuracy with Wilson intervals.

    Wilson intervals count images; when patients contribute several images they are somewhat
    too narrow (the bootstrap intervals of AUC and F1 resample patients instead).

    Returns:
        Per rate: ``value``, ``ci`` ``[low, high]``, ``successes`` and ``total``.
    """
    fractions = rate_fractions(*confusion_counts(y_true, p_pneumonia, threshold))
    return {
        name: {
            "value": _ratio(k, total),
            "ci": list(wilson_interval(k, total, confidence)),
            "successes": k,
            "total": total,
        }
        for name, (k, total) in fractions.items()
    }


def _flagged_by_group(
    members_of: np.ndarray,
    groups: np.ndarray,
    flagged: np.ndarray,
    count_flagged: bool,
    confidence: float,
) -> dict[str, dict[str, Any]]:
    """Per group among ``members_of``: how many images, how many (not) flagged, the rate."""
    result: dict[str, dict[str, Any]] = {}
    for group in sorted(set(groups[members_of])):
        members = members_of & (groups == group)
        n = int(members.sum())
        hits = int(flagged[members].sum()) if count_flagged else int((~flagged[members]).sum())
        result[str(group)] = {
            "n": n,
            "detected" if count_flagged else "cleared": hits,
            "sensitivity" if count_flagged else "specificity": _ratio(hits, n),
            "ci": list(wilson_interval(hits, n, confidence)),
        }
    return result


def sensitivity_by_subtype(
    y_true: np.ndarray,
    p_pneumonia: np.ndarray,
    subtypes: Sequence[str] | np.ndarray,
    threshold: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, dict[str, Any]]:
    """Share of each pneumonia subtype (``bacteria``, ``virus``, ...) flagged, with Wilson CIs.

    Returns:
        Per subtype present among the positives: ``n``, ``detected``, ``sensitivity``, ``ci``.
    """
    y_true = np.asarray(y_true).astype(int)
    flagged = predict_labels(p_pneumonia, threshold).astype(bool)
    return _flagged_by_group(
        y_true == 1, np.asarray(subtypes).astype(str), flagged, True, confidence
    )


def specificity_by_source(
    y_true: np.ndarray,
    p_pneumonia: np.ndarray,
    sources: Sequence[str] | np.ndarray,
    threshold: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, dict[str, Any]]:
    """Share of the normal images of each source series left unflagged, with Wilson CIs.

    Returns:
        Per source present among the negatives: ``n``, ``cleared``, ``specificity``, ``ci``.
    """
    y_true = np.asarray(y_true).astype(int)
    flagged = predict_labels(p_pneumonia, threshold).astype(bool)
    return _flagged_by_group(
        y_true == 0, np.asarray(sources).astype(str), flagged, False, confidence
    )


def _bootstrap_record(
    n_resamples: int,
    seed: int,
    confidence: float,
    groups: np.ndarray | None,
    n_units: int,
    auc_replicates: np.ndarray,
) -> dict[str, Any]:
    """How a result's bootstrap intervals were made (the ``bootstrap`` entry)."""
    return {
        "n_resamples": n_resamples,
        "seed": seed,
        "confidence": confidence,
        "unit": "patient" if groups is not None else "image",
        "n_units": n_units,
        "undefined_resamples": int(np.isnan(auc_replicates).sum()),
    }


def subtype_metrics(
    is_viral: np.ndarray,
    p_viral: np.ndarray,
    called_bacterial: np.ndarray,
    threshold: float,
    groups: np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """How well a bacterial-or-viral estimate tells the two causes apart, on pneumonias whose
    cause is known, each figure with its uncertainty.

    Bacterial is the positive class, as in the estimate's operating point: calling a bacterial
    pneumonia viral is the costly error, so its sensitivity is what a threshold guarantees.

    Args:
        is_viral: 1 for viral, 0 for bacterial pneumonia.
        p_viral: Calibrated P(viral) per image.
        called_bacterial: The call the model made per image (True: bacterial); taken as given
            so that the figures are those of the model's own rule, not a copy of it.
        threshold: The threshold of that call on P(bacterial) = 1 - P(viral), reported.
        groups: Patient id per image: the AUC bootstrap then resamples patients. ``None``
            resamples images.
        n_resamples: Bootstrap resamples for the AUC interval.
        seed: Bootstrap seed.
        confidence: Coverage of every interval.

    Returns:
        ``n``, ``n_bacterial``, ``n_viral``, ``n_patients``; ``auc`` (P(viral) ranking viral
        above bacterial, equal to P(bacterial) ranking bacterial above viral) and ``auc_ci``
        (percentile bootstrap, as :func:`evaluation_metrics`); ``bacterial_sensitivity``
        (bacterial called bacterial) and ``viral_specificity`` (viral called viral), each with
        ``_ci`` (Wilson) and ``_fraction`` ``[successes, total]``; ``ece`` of P(viral)
        (:func:`expected_calibration_error`, 10 bins); ``threshold``; ``confusion_matrix``
        ``[[viral called viral, viral called bacterial], [bacterial called viral, bacterial
        called bacterial]]``; and ``bootstrap``. Undefined figures are NaN.
    """
    is_viral = np.asarray(is_viral).astype(int)
    p_viral = np.asarray(p_viral, dtype=float)
    is_bacterial = 1 - is_viral
    called = np.asarray(called_bacterial).astype(bool).astype(int)
    matrix = confusion_matrix(is_bacterial, called, labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in matrix.ravel())
    fractions = rate_fractions(tn, fp, fn, tp)
    replicates = bootstrap_replicates(
        is_viral, [p_viral], [weighted_roc_auc], groups, n_resamples, seed
    )[0, 0]
    _, n_units = _resample_units(groups, len(is_viral))
    result: dict[str, Any] = {
        "n": len(is_viral),
        "n_bacterial": int(is_bacterial.sum()),
        "n_viral": int(is_viral.sum()),
        "n_patients": n_units if groups is not None else None,
        "auc": safe_roc_auc(is_viral, p_viral),
        "auc_ci": list(percentile_interval(replicates, confidence)),
    }
    named = {"bacterial_sensitivity": "sensitivity", "viral_specificity": "specificity"}
    for name, rate in named.items():
        k, total = fractions[rate]
        result |= {
            name: _ratio(k, total),
            f"{name}_ci": list(wilson_interval(k, total, confidence)),
            f"{name}_fraction": [k, total],
        }
    return result | {
        "ece": expected_calibration_error(is_viral, p_viral, CALIBRATION_BINS),
        "threshold": float(threshold),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "bootstrap": _bootstrap_record(n_resamples, seed, confidence, groups, n_units, replicates),
    }


def specificity_at_sensitivity(y_true: np.ndarray, p_pneumonia: np.ndarray, target: float) -> float:
    """The best specificity among thresholds whose sensitivity on these images is >= target
    (the ROC curve read at one sensitivity; an optimistic, threshold-free summary)."""
    fpr, tpr, _ = roc_curve(np.asarray(y_true).astype(int), p_pneumonia)
    reaching = tpr >= target - 1e-12
    return float(1.0 - fpr[reaching].min()) if reaching.any() else float("nan")


def threshold_sweep(
    y_true: np.ndarray, p_pneumonia: np.ndarray, thresholds: Sequence[float] = SWEEP_THRESHOLDS
) -> pd.DataFrame:
    """The trade-off between missed pneumonia and false alarms, one row per threshold.

    Returns:
        Columns ``threshold, sensitivity, specificity, ppv, npv, flagged`` (share of images
        flagged PNEUMONIA), ``missed`` (false negatives) and ``false_alarms`` (false
        positives), sorted by threshold.
    """
    rows = []
    for threshold in sorted(set(float(t) for t in thresholds)):
        tn, fp, fn, tp = confusion_counts(y_true, p_pneumonia, threshold)
        rates = rate_fractions(tn, fp, fn, tp)
        rows.append(
            {
                "threshold": threshold,
                **{
                    name: _ratio(*rates[name])
                    for name in ("sensitivity", "specificity", "ppv", "npv")
                },
                "flagged": _ratio(tp + fp, tn + fp + fn + tp),
                "missed": fn,
                "false_alarms": fp,
            }
        )
    return pd.DataFrame(rows)


def reliability_table(
    y_true: np.ndarray,
    p_pneumonia: np.ndarray,
    bins: int = CALIBRATION_BINS,
    confidence: float = DEFAULT_CONFIDENCE,
) -> pd.DataFrame:
    """Per probability bin (the bins of :func:`expected_calibration_error`): how many images,
    their mean P(pneumonia), the observed pneumonia rate and its Wilson interval.

    Returns:
        Columns ``bin_low, bin_high, n, mean_predicted, observed, ci_low, ci_high``; empty bins
        have ``n`` 0 and NaN elsewhere.
    """
    y_true = np.asarray(y_true).astype(int)
    p_pneumonia = np.asarray(p_pneumonia, dtype=float)
    which = _bin_index(p_pneumonia, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    rows = []
    for b in range(bins):
        members = which == b
        n, positives = int(members.sum()), int(y_true[members].sum())
        low, high = wilson_interval(positives, n, confidence)
        rows.append(
            {
                "bin_low": float(edges[b]),
                "bin_high": float(edges[b + 1]),
                "n": n,
                "mean_predicted": float(p_pneumonia[members].mean()) if n else float("nan"),
                "observed": _ratio(positives, n),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(rows)


def paired_auc_difference(
    y_true: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    groups: np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """ROC AUC of B minus A on the same images, with a paired bootstrap interval.

    Returns:
        ``auc_a``, ``auc_b``, ``difference`` (B - A), ``ci`` ``[low, high]``, ``p_value``
        (two-sided bootstrap: twice the smaller share of resamples on either side of 0),
        ``significant`` (the interval excludes 0), and ``auc_a_ci``/``auc_b_ci``.
    """
    replicates = bootstrap_replicates(
        y_true, [p_a, p_b], [weighted_roc_auc], groups, n_resamples, seed
    )[:, 0]
    difference = replicates[1] - replicates[0]
    defined = difference[~np.isnan(difference)]
    low, high = percentile_interval(difference, confidence)
    p_value = (
        min(1.0, 2 * min(float(np.mean(defined <= 0)), float(np.mean(defined >= 0))))
        if defined.size
        else float("nan")
    )
    auc_a, auc_b = safe_roc_auc(y_true, p_a), safe_roc_auc(y_true, p_b)
    return {
        "auc_a": auc_a,
        "auc_b": auc_b,
        "auc_a_ci": list(percentile_interval(replicates[0], confidence)),
        "auc_b_ci": list(percentile_interval(replicates[1], confidence)),
        "difference": auc_b - auc_a,
        "ci": [low, high],
        "p_value": p_value,
        "significant": bool(low > 0 or high < 0),
        "confidence": confidence,
        "n_resamples": n_resamples,
        "undefined_resamples": int(difference.size - defined.size),
    }


def evaluation_metrics(
    y_true: np.ndarray,
    p_pneumonia: np.ndarray,
    threshold: float,
    groups: np.ndarray | None = None,
    subtypes: Sequence[str] | np.ndarray | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    confidence: float = DEFAULT_CONFIDENCE,
    sources: Sequence[str] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Everything the evaluation reports, each figure with its uncertainty.

    Args:
        y_true: 0/1 labels.
        p_pneumonia: Scores in [0, 1].
        threshold: Operating threshold.
        groups: Patient id per image: the bootstrap then resamples patients, since images of
            one patient are not independent. ``None`` resamples images.
        subtypes: Subtype per image (``bacteria``, ``virus``, ``normal``...) for
            ``per_subtype``.
        n_resamples: Bootstrap resamples for the AUC, PR AUC and F1 intervals.
        seed: Bootstrap seed.
        confidence: Coverage of every interval.
        sources: Source series per image (:func:`pneumoscan.data.dataset.source_from_name`) for
            ``per_source`` specificity.

    Returns:
        :func:`binary_metrics` plus ``per_source``, ``auc_ci``, ``pr_auc``, ``pr_auc_ci``,
        ``f1``, ``f1_ci``,
        ``ppv`` (= ``precision``), ``sensitivity_ci``, ``specificity_ci``, ``ppv_ci``,
        ``npv_ci``, ``accuracy_ci``, ``ece``, ``brier``, ``per_subtype``, ``threshold_sweep``
        and ``calibration_bins`` (lists of row dicts), ``n_positive``, ``n_negative``,
        ``n_patients`` and ``bootstrap`` (how the intervals were made).
    """
    y_true = np.asarray(y_true).astype(int)
    p_pneumonia = np.asarray(p_pneumonia, dtype=float)
    result = binary_metrics(y_true, p_pneumonia, threshold)
    rates = rates_with_intervals(y_true, p_pneumonia, threshold, confidence)
    replicates = bootstrap_replicates(
        y_true,
        [p_pneumonia],
        [weighted_roc_auc, weighted_average_precision, weighted_f1(threshold)],
        groups,
        n_resamples,
        seed,
    )[0]
    _, fp, fn, tp = confusion_counts(y_true, p_pneumonia, threshold)
    _, n_units = _resample_units(groups, len(y_true))
    result |= {
        "auc_ci": list(percentile_interval(replicates[0], confidence)),
        "pr_auc": safe_average_precision(y_true, p_pneumonia),
        "pr_auc_ci": list(percentile_interval(replicates[1], confidence)),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "f1_ci": list(percentile_interval(replicates[2], confidence)),
        "ppv": rates["ppv"]["value"],
        **{f"{name}_ci": rate["ci"] for name, rate in rates.items()},
        "ece": expected_calibration_error(y_true, p_pneumonia, CALIBRATION_BINS),
        "brier": brier_score(y_true, p_pneumonia) if len(y_true) else float("nan"),
        "per_subtype": (
            {}
            if subtypes is None
            else sensitivity_by_subtype(y_true, p_pneumonia, subtypes, threshold, confidence)
        ),
        "per_source": (
            {}
            if sources is None
            else specificity_by_source(y_true, p_pneumonia, sources, threshold, confidence)
        ),
        "threshold_sweep": threshold_sweep(
            y_true, p_pneumonia, (*SWEEP_THRESHOLDS, threshold)
        ).to_dict("records"),
        "calibration_bins": reliability_table(
            y_true, p_pneumonia, CALIBRATION_BINS, confidence
        ).to_dict("records"),
        "n_positive": int(y_true.sum()),
        "n_negative": int((1 - y_true).sum()),
        "n_patients": n_units if groups is not None else None,
        "bootstrap": _bootstrap_record(
            n_resamples, seed, confidence, groups, n_units, replicates[0]
        ),
    }
    return result
