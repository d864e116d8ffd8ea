"""Tests for pneumoscan.inference.calibration."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.inference.calibration import (
    apply_temperature,
    fit_temperature,
    fit_temperature_and_bias,
    probability_to_logit,
    sensitivity_lower_bound,
    threshold_between_scores,
    threshold_for_sensitivity,
    threshold_with_confidence,
)
from pneumoscan.metrics import binary_metrics, expected_calibration_error


def test_threshold_meets_the_target_with_the_best_specificity() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.3, 0.5, 0.7, 0.2, 0.4, 0.6, 0.65, 0.8, 0.85, 0.9, 0.92, 0.95, 0.99])
    # 10 positives: 90% sensitivity may miss one (the 0.2), so the threshold catches the 0.4
    # and sits halfway (logit scale) to the next lower score, the normal at 0.3.
    assert 0.3 < threshold_for_sensitivity(y, p, 0.9) < 0.4
    assert threshold_for_sensitivity(y, p, 0.9) == pytest.approx(1 / (1 + np.sqrt(3.5)))
    assert 0.1 < threshold_for_sensitivity(y, p, 1.0) < 0.2
    assert 0.5 < threshold_for_sensitivity(y, p, 0.8) < 0.6
    for target in (0.8, 0.9, 0.97, 1.0):
        threshold = threshold_for_sensitivity(y, p, target)
        assert binary_metrics(y, p, threshold)["sensitivity"] >= target
    with pytest.raises(ValueError, match="PNEUMONIA"):
        threshold_for_sensitivity(np.zeros(3), p[:3], 0.9)


def test_temperature_keeps_ranks_and_repairs_overconfidence() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    score = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.2, y.size)
    # Two Gaussians at +-1 with sd 1.2: the true posterior logit is 2 * score / 1.2**2.
    true_logit = 2 * score / 1.44
    honest = 1 / (1 + np.exp(-true_logit))
    # An overconfident model: the same ranking, logits 4x too large.
    overconfident = 1 / (1 + np.exp(-4 * true_logit))
    temperature = fit_temperature(y, overconfident)
    assert 3.0 < temperature < 5.5
    repaired = apply_temperature(overconfident, temperature)
    order = np.argsort(overconfident, kind="stable")
    assert np.all(np.diff(repaired[order]) >= 0)  # a monotone map: ranks and AUC unchanged
    assert (
        expected_calibration_error(y, repaired) < expected_calibration_error(y, overconfident) / 2
    )
    assert (
        abs(expected_calibration_error(y, repaired) - expected_calibration_error(y, honest)) < 0.03
    )


def test_logit_round_trip_and_identity() -> None:
    p = np.array([0.01, 0.5, 0.99])
    np.testing.assert_allclose(1 / (1 + np.exp(-probability_to_logit(p))), p)
    np.testing.assert_array_equal(apply_temperature(p, 1.0), p)
    with pytest.raises(ValueError, match="both"):
        fit_temperature(np.ones(4), np.full(4, 0.9))


def test_temperature_and_bias_undo_a_site_shift() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 3000)
    true_logit = 2 * (np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.2, y.size)) / 1.44
    # A new site: every logit 2.0 higher (normals look more like pneumonia) and overconfident.
    shifted = 1 / (1 + np.exp(-(2.0 * true_logit + 2.0)))
    temperature, bias = fit_temperature_and_bias(y, shifted)
    assert 1.7 < temperature < 2.3 and -1.3 < bias < -0.7
    repaired = apply_temperature(shifted, temperature, bias)
    assert expected_calibration_error(y, repaired) < 0.03
    only_temperature = apply_temperature(shifted, fit_temperature(y, shifted))
    assert expected_calibration_error(y, repaired) < expected_calibration_error(y, only_temperature)


def test_confident_threshold_leaves_a_margin_that_shrinks_with_the_sample() -> None:
    # 100 positives scored 0.01..1.00: the plain 95% rule may miss 5 of them.
    y = np.ones(100, int)
    p = np.arange(1, 101) / 100
    assert threshold_with_confidence(y, p, 0.95, 0.5) == (
        threshold_for_sensitivity(y, p, 0.95),
        True,
    )
    threshold, reachable = threshold_with_confidence(y, p, 0.95, 0.8)
    caught = int(np.sum(p >= threshold))
    assert reachable and caught > 95
    # The bound at the chosen threshold reaches the target; one more miss would not.
    assert sensitivity_lower_bound(caught, 100, 0.8) >= 0.95
    assert sensitivity_lower_bound(caught - 1, 100, 0.8) < 0.95
    # Ten times the images: the margin shrinks (nearer the plain rule's 95%).
    many, _ = threshold_with_confidence(np.ones(1000, int), np.arange(1, 1001) / 1000, 0.95, 0.8)
    assert 0.95 < np.mean(np.arange(1, 1001) / 1000 >= many) < caught / 100


def test_confident_threshold_says_when_the_sample_is_too_small() -> None:
    threshold, reachable = threshold_with_confidence(
        np.ones(10, int), np.linspace(0.1, 1, 10), 0.97, 0.9
    )
    assert not reachable and threshold == pytest.approx(0.1)  # catches every pneumonia image
    with pytest.raises(ValueError, match="confidence"):
        threshold_with_confidence(np.ones(3, int), np.ones(3), 0.9, 1.0)


def test_a_threshold_between_scores_survives_backend_noise() -> None:
    # calibrate fitted on Keras, predict scored on ONNX: a threshold equal to a pneumonia
    # image's score lost that image to a 1e-7 difference (0.969 promised, 0.961 delivered).
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(60, int), np.ones(90, int)]
    p = np.r_[rng.beta(2, 5, 60), rng.beta(5, 2, 90)]
    for target, confidence in ((0.95, 0.5), (0.95, 0.8), (0.9, 0.9)):
        threshold, _ = threshold_with_confidence(y, p, target, confidence)
        fitted = binary_metrics(y, p, threshold)["confusion_matrix"]
        for noise in (-1e-6, 1e-6):
            assert binary_metrics(y, p + noise, threshold)["confusion_matrix"] == fitted
    assert threshold_between_scores(np.array([0.5, 0.9]), 0.5) == 0.5  # nothing below


def test_lower_bound_matches_scipy_wilson() -> None:
    from scipy.stats import binomtest

    low = binomtest(95, 100).proportion_ci(0.9, method="wilson").low
    assert sensitivity_lower_bound(95, 100, 0.95) == pytest.approx(low)
    assert sensitivity_lower_bound(95, 100, 0.5) == 0.95
