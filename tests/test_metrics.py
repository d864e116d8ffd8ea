"""Tests for pneumoscan.metrics against hand-worked cases."""

from __future__ import annotations

import math

import numpy as np

from pneumoscan.metrics import (
    binary_metrics,
    brier_score,
    expected_calibration_error,
    predict_labels,
    report_text,
    safe_roc_auc,
    wilson_interval,
)


def test_binary_metrics_hand_worked() -> None:
    # 3 normals (one false alarm), 4 pneumonias (one missed).
    y_true = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.4, 0.7, 0.2, 0.6, 0.8, 0.9])
    result = binary_metrics(y_true, scores, threshold=0.5)
    assert result["confusion_matrix"] == [[2, 1], [1, 3]]
    assert result["sensitivity"] == 3 / 4
    assert result["specificity"] == 2 / 3
    assert result["precision"] == 3 / 4
    assert result["npv"] == 2 / 3
    assert result["accuracy"] == 5 / 7
    # Of the 12 (normal, pneumonia) pairs, 9 are ranked correctly.
    assert math.isclose(result["auc"], 9 / 12)


def test_threshold_is_inclusive() -> None:
    assert predict_labels(np.array([0.5, 0.49]), 0.5).tolist() == [1, 0]


def test_undefined_rates_are_nan() -> None:
    result = binary_metrics(np.array([1, 1]), np.array([0.9, 0.2]), 0.5)
    assert math.isnan(result["specificity"]) and math.isnan(result["auc"])
    assert math.isnan(safe_roc_auc(np.array([0, 0]), np.array([0.1, 0.2])))


def test_report_names_both_classes() -> None:
    text = report_text(np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4]), 0.5)
    assert "NORMAL" in text and "PNEUMONIA" in text and "0.667" in text


def test_wilson_interval_known_values() -> None:
    # 60/62 observed: the interval quoted in issue 3 is roughly 89-99%.
    low, high = wilson_interval(60, 62)
    assert 0.88 < low < 0.90 and 0.99 < high < 0.995
    assert wilson_interval(0, 10)[0] == 0.0
    assert math.isclose(wilson_interval(10, 10)[1], 1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_expected_calibration_error_hand_worked() -> None:
    # Bin (0.1, 0.2]: two images at 0.15, one positive -> gap 0.35; bin (0.8, 0.9]: two at 0.9,
    # both positive -> gap 0.1. Weighted: (2 * 0.35 + 2 * 0.1) / 4 = 0.225.
    y = np.array([0, 1, 1, 1])
    p = np.array([0.15, 0.15, 0.9, 0.9])
    assert math.isclose(expected_calibration_error(y, p), 0.225)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


def test_brier_score() -> None:
    assert math.isclose(brier_score(np.array([0, 1]), np.array([0.2, 0.6])), (0.04 + 0.16) / 2)
