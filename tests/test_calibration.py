"""Tests for pneumoscan.calibration."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.calibration import (
    apply_temperature,
    fit_temperature,
    fit_temperature_and_bias,
    probability_to_logit,
    threshold_for_sensitivity,
)
from pneumoscan.metrics import binary_metrics, expected_calibration_error


def test_threshold_meets_the_target_with_the_best_specificity() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    p = np.array([0.1, 0.3, 0.5, 0.7, 0.2, 0.4, 0.6, 0.65, 0.8, 0.85, 0.9, 0.92, 0.95, 0.99])
    # 10 positives: 90% sensitivity may miss one (the 0.2), so the threshold is 0.4.
    assert threshold_for_sensitivity(y, p, 0.9) == 0.4
    assert threshold_for_sensitivity(y, p, 1.0) == 0.2
    assert threshold_for_sensitivity(y, p, 0.8) == 0.6
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
