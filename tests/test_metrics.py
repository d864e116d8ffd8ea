"""Tests for pneumoscan.metrics against hand-worked cases."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from pneumoscan.metrics import (
    binary_metrics,
    bootstrap_replicates,
    brier_score,
    evaluation_metrics,
    expected_calibration_error,
    paired_auc_difference,
    percentile_interval,
    predict_labels,
    rates_with_intervals,
    reliability_table,
    report_text,
    safe_average_precision,
    safe_roc_auc,
    sensitivity_by_subtype,
    specificity_at_sensitivity,
    specificity_by_source,
    subtype_metrics,
    threshold_sweep,
    weighted_average_precision,
    weighted_f1,
    weighted_roc_auc,
    wilson_interval,
)

# The hand-worked case of test_binary_metrics_hand_worked: 3 normals, 4 pneumonias.
Y7 = np.array([0, 0, 0, 1, 1, 1, 1])
P7 = np.array([0.1, 0.4, 0.7, 0.2, 0.6, 0.8, 0.9])


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


def test_pr_auc_hand_worked() -> None:
    # From the highest score down: 0.8 (pneumonia) precision 1, recall 1/2; 0.4 (normal);
    # 0.35 (pneumonia) precision 2/3, recall 1. AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    assert math.isclose(safe_average_precision(y, p), 5 / 6)
    assert math.isclose(weighted_average_precision(y, p, np.ones((1, 4)))[0], 5 / 6)
    assert math.isnan(safe_average_precision(np.zeros(2), np.array([0.1, 0.2])))


def test_weighted_roc_auc_hand_worked() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    # Unweighted: 3 of the 4 (normal, pneumonia) pairs are ordered correctly.
    # Weights [1, 2, 1, 1]: 0.35 beats 1 of 3 normal weight, 0.8 beats 3 of 3 -> 4/6.
    weights = np.array([[1, 1, 1, 1], [1, 2, 1, 1], [1, 1, 0, 0]], dtype=float)
    auc = weighted_roc_auc(y, p, weights)
    assert auc[:2].tolist() == [0.75, 4 / 6]
    assert math.isnan(auc[2])  # no pneumonia left in that resample
    # A tie counts one half, as in scikit-learn.
    assert weighted_roc_auc(np.array([0, 1]), np.array([0.5, 0.5]), np.ones((1, 2)))[0] == 0.5


def test_weighted_statistics_equal_scikit_learn_with_sample_weights() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(0.3 * y + 0.7 * rng.random(300), 0, 1), 2)  # many ties
    weights = rng.integers(0, 3, (5, 300)).astype(float)
    for row, w in enumerate(weights):
        assert math.isclose(
            weighted_roc_auc(y, p, weights)[row], roc_auc_score(y, p, sample_weight=w)
        )
        assert math.isclose(
            weighted_average_precision(y, p, weights)[row],
            average_precision_score(y, p, sample_weight=w),
        )
        assert math.isclose(
            weighted_f1(0.5)(y, p, weights)[row], f1_score(y, p >= 0.5, sample_weight=w)
        )


def test_rates_with_wilson_intervals_hand_worked() -> None:
    rates = rates_with_intervals(Y7, P7, 0.5)
    assert rates["sensitivity"]["successes"] == 3 and rates["sensitivity"]["total"] == 4
    # Wilson 95% interval of 3/4: (0.301, 0.954).
    low, high = rates["sensitivity"]["ci"]
    assert math.isclose(low, 0.3006, abs_tol=5e-4) and math.isclose(high, 0.9544, abs_tol=5e-4)
    assert rates["specificity"]["ci"] == list(wilson_interval(2, 3))
    assert rates["ppv"]["value"] == 3 / 4 and rates["npv"]["value"] == 2 / 3
    assert rates["accuracy"]["value"] == 5 / 7
    assert rates["npv"]["ci"] == list(wilson_interval(2, 3))


def test_evaluation_metrics_hand_worked_point_values() -> None:
    result = evaluation_metrics(Y7, P7, 0.5, n_resamples=200)
    assert result["f1"] == 2 * 3 / (2 * 3 + 1 + 1)  # tp 3, fp 1, fn 1
    assert result["ppv"] == result["precision"] == 3 / 4
    assert math.isclose(result["auc"], 9 / 12)
    assert result["bootstrap"]["unit"] == "image" and result["n_patients"] is None
    assert result["n_positive"] == 4 and result["n_negative"] == 3
    for key in ("auc", "pr_auc", "f1", "sensitivity", "specificity"):
        low, high = result[f"{key}_ci"]
        assert low <= result[key] <= high, key
    json.dumps(result)  # JSON-ready: plain floats, ints, lists and dicts


def test_threshold_sweep_hand_worked() -> None:
    sweep = threshold_sweep(Y7, P7, [0.5, 0.05, 0.95]).set_index("threshold")
    assert list(sweep.index) == [0.05, 0.5, 0.95]
    assert sweep.loc[0.5, "sensitivity"] == 3 / 4 and sweep.loc[0.5, "specificity"] == 2 / 3
    assert sweep.loc[0.5, "missed"] == 1 and sweep.loc[0.5, "false_alarms"] == 1
    # Everything flagged: every pneumonia found, every normal a false alarm.
    assert sweep.loc[0.05, "sensitivity"] == 1.0 and sweep.loc[0.05, "specificity"] == 0.0
    assert sweep.loc[0.05, "ppv"] == 4 / 7 and math.isnan(sweep.loc[0.05, "npv"])
    assert sweep.loc[0.05, "flagged"] == 1.0
    # Nothing flagged.
    assert sweep.loc[0.95, "sensitivity"] == 0.0 and sweep.loc[0.95, "npv"] == 3 / 7
    assert math.isnan(sweep.loc[0.95, "ppv"])


def test_reliability_table_hand_worked() -> None:
    y = np.array([0, 1, 1, 1])
    p = np.array([0.15, 0.15, 0.9, 0.9])
    table = reliability_table(y, p)
    assert len(table) == 10 and table["n"].sum() == 4
    low_bin, high_bin = table.iloc[1], table.iloc[8]  # (0.1, 0.2] and (0.8, 0.9]
    assert low_bin["n"] == 2 and low_bin["observed"] == 0.5
    assert math.isclose(low_bin["mean_predicted"], 0.15)
    assert high_bin["observed"] == 1.0 and high_bin["ci_high"] == 1.0
    assert table.iloc[0]["n"] == 0 and math.isnan(table.iloc[0]["observed"])
    # ECE is the image-weighted gap of this table's bins.
    filled = table[table["n"] > 0]
    gap = (filled["n"] * (filled["mean_predicted"] - filled["observed"]).abs()).sum() / 4
    assert math.isclose(gap, expected_calibration_error(y, p))


def test_sensitivity_by_subtype_hand_worked() -> None:
    y = np.array([1, 1, 1, 0])
    p = np.array([0.9, 0.2, 0.7, 0.1])
    result = sensitivity_by_subtype(y, p, ["bacteria", "bacteria", "virus", "normal"], 0.5)
    assert set(result) == {"bacteria", "virus"}
    assert result["bacteria"] == {
        "n": 2,
        "detected": 1,
        "sensitivity": 0.5,
        "ci": list(wilson_interval(1, 2)),
    }
    assert result["virus"]["sensitivity"] == 1.0


def _scored_patients(n_patients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n_patients) % 2
    return y, np.clip(0.25 * y + 0.75 * rng.random(n_patients), 0, 1)


def test_bootstrap_is_seeded() -> None:
    y, p = _scored_patients(80)
    first = evaluation_metrics(y, p, 0.5, n_resamples=300, seed=7)
    again = evaluation_metrics(y, p, 0.5, n_resamples=300, seed=7)
    other = evaluation_metrics(y, p, 0.5, n_resamples=300, seed=8)
    assert first["auc_ci"] == again["auc_ci"] and first["f1_ci"] == again["f1_ci"]
    assert first["auc_ci"] != other["auc_ci"]


def test_patient_bootstrap_is_not_fooled_by_repeated_images() -> None:
    # 60 patients with one image each, then the same patients with 5 identical images each.
    y, p = _scored_patients(60)
    patients = np.array([f"person{i}" for i in range(60)])
    y5, p5, patients5 = (np.repeat(a, 5) for a in (y, p, patients))

    def width(interval: list[float]) -> float:
        return interval[1] - interval[0]

    base = evaluation_metrics(y, p, 0.5, groups=patients)["auc_ci"]
    by_patient = evaluation_metrics(y5, p5, 0.5, groups=patients5)
    by_image = evaluation_metrics(y5, p5, 0.5)["auc_ci"]
    # Resampling patients: copies add no information, the interval is the same.
    assert np.allclose(by_patient["auc_ci"], base)
    assert by_patient["bootstrap"] | {"undefined_resamples": 0} == {
        "n_resamples": 2000,
        "seed": 42,
        "confidence": 0.95,
        "unit": "patient",
        "n_units": 60,
        "undefined_resamples": 0,
    }
    # Resampling images treats 300 copies as 300 patients: falsely narrow (about 1/sqrt(5)).
    assert width(by_image) < 0.6 * width(base)


def test_bootstrap_of_a_perfect_scorer_and_undefined_resamples() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    replicates = bootstrap_replicates(y, [p], [weighted_roc_auc], n_resamples=500, seed=0)
    assert replicates.shape == (1, 1, 500)
    defined = replicates[~np.isnan(replicates)]
    assert np.all(defined == 1.0)
    assert np.isnan(replicates).any()  # with 6 images some resamples hold one class only
    assert percentile_interval(replicates[0, 0]) == (1.0, 1.0)
    assert all(math.isnan(v) for v in percentile_interval(np.full(3, np.nan)))


def test_bootstrap_of_600_images_is_fast() -> None:
    y, p = _scored_patients(600)
    patients = np.arange(600) // 2
    started = time.perf_counter()
    evaluation_metrics(y, p, 0.5, groups=patients, n_resamples=2000)
    assert time.perf_counter() - started < 2.0


def test_paired_difference_of_identical_models_is_zero() -> None:
    y, p = _scored_patients(100)
    result = paired_auc_difference(y, p, p.copy(), groups=np.arange(100) // 2, n_resamples=500)
    assert result["difference"] == 0.0 and result["ci"] == [0.0, 0.0]
    assert not result["significant"] and result["p_value"] == 1.0


def test_paired_difference_finds_a_real_gap() -> None:
    rng = np.random.default_rng(3)
    y = np.arange(200) % 2
    good = np.clip(0.6 * y + 0.4 * rng.random(200), 0, 1)
    random = rng.random(200)
    result = paired_auc_difference(y, random, good, n_resamples=1000)
    assert result["difference"] > 0.3
    assert result["significant"] and result["ci"][0] > 0 and result["p_value"] < 0.01
    assert result["auc_a_ci"][0] < result["auc_a"] < result["auc_a_ci"][1]


@pytest.mark.parametrize("confidence", [0.8, 0.95])
def test_wider_confidence_gives_wider_intervals(confidence: float) -> None:
    y, p = _scored_patients(100)
    narrow = evaluation_metrics(y, p, 0.5, n_resamples=500, confidence=0.5)
    wide = evaluation_metrics(y, p, 0.5, n_resamples=500, confidence=confidence)
    for key in ("auc_ci", "sensitivity_ci"):
        assert wide[key][0] < narrow[key][0] and wide[key][1] > narrow[key][1]


def test_specificity_by_source_counts_normals_left_unflagged() -> None:
    y = np.array([0, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.1, 0.2, 0.8, 0.7, 0.9])
    sources = ["NORMAL2-IM", "NORMAL2-IM", "IM", "IM", "IM", "person"]
    result = specificity_by_source(y, p, sources, 0.5)
    assert set(result) == {"IM", "NORMAL2-IM"}  # pneumonia images are not counted
    assert result["NORMAL2-IM"]["cleared"] == 1 and result["NORMAL2-IM"]["n"] == 2
    assert result["IM"]["specificity"] == pytest.approx(1 / 3)
    assert result["IM"]["ci"] == list(wilson_interval(1, 3))
    metrics = evaluation_metrics(y, p, 0.5, sources=sources, n_resamples=50)
    assert metrics["per_source"] == result


def test_specificity_at_sensitivity_reads_the_roc_curve() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.65, 0.4, 0.6, 0.7, 0.8])
    # All four positives need threshold 0.4: three of four normals are below it.
    assert specificity_at_sensitivity(y, p, 1.0) == 0.75
    assert specificity_at_sensitivity(y, p, 0.75) == 0.75
    assert specificity_at_sensitivity(y, p, 0.5) == 1.0


def _wilson_by_hand(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def test_subtype_metrics_hand_worked() -> None:
    # 3 bacterial, 2 viral pneumonias. The calls (threshold 0.5 on P(bacterial) = 1 - P(viral))
    # are bacterial for P(viral) 0.1 and 0.3 only: 2 of 3 bacterial called bacterial, 2 of 2
    # viral called viral. Of the 6 (viral, bacterial) pairs, P(viral) 0.6 is above 0.1 and 0.3,
    # 0.9 above all three: 5/6. ECE, one image per bin: (0.1 + 0.3 + 0.7 + 0.4 + 0.1) / 5.
    is_viral = np.array([0, 0, 0, 1, 1])
    p_viral = np.array([0.1, 0.3, 0.7, 0.6, 0.9])
    called = (1 - p_viral) >= 0.5
    result = subtype_metrics(is_viral, p_viral, called, 0.5, n_resamples=200)
    assert (result["n"], result["n_bacterial"], result["n_viral"]) == (5, 3, 2)
    assert math.isclose(result["auc"], 5 / 6)
    assert result["bacterial_sensitivity"] == 2 / 3
    assert result["bacterial_sensitivity_fraction"] == [2, 3]
    assert result["viral_specificity"] == 1.0 and result["viral_specificity_fraction"] == [2, 2]
    np.testing.assert_allclose(result["bacterial_sensitivity_ci"], _wilson_by_hand(2, 3))
    low, high = result["viral_specificity_ci"]
    assert math.isclose(low, _wilson_by_hand(2, 2)[0]) and high == 1.0
    assert math.isclose(result["ece"], 1.6 / 5)
    assert result["threshold"] == 0.5
    # Rows: true viral, true bacterial; columns: called viral, called bacterial.
    assert result["confusion_matrix"] == [[2, 0], [1, 2]]
    low, high = result["auc_ci"]
    assert low <= result["auc"] <= high
    assert result["n_patients"] is None and result["bootstrap"]["unit"] == "image"
    json.dumps(result)  # plain JSON values


def test_subtype_metrics_takes_the_calls_as_given_and_resamples_patients() -> None:
    # The rates follow the calls passed in, not a threshold of their own.
    is_viral = np.array([0, 0, 1, 1])
    p_viral = np.array([0.2, 0.4, 0.6, 0.8])
    everything_bacterial = np.ones(4, dtype=bool)
    result = subtype_metrics(
        is_viral, p_viral, everything_bacterial, 0.1, groups=np.array(["a", "a", "b", "c"]),
        n_resamples=300,
    )  # fmt: skip
    assert result["bacterial_sensitivity"] == 1.0 and result["viral_specificity"] == 0.0
    assert result["auc"] == 1.0 and result["auc_ci"] == [1.0, 1.0]
    assert result["n_patients"] == 3 and result["bootstrap"]["n_units"] == 3
    assert result["bootstrap"]["unit"] == "patient"
    # Resamples drawing only bacterial (or only viral) patients leave the AUC undefined.
    assert result["bootstrap"]["undefined_resamples"] > 0
    # One cause only: the AUC and the other cause's rate are undefined.
    bacterial_only = subtype_metrics(np.zeros(3), np.array([0.1, 0.2, 0.9]), np.ones(3), 0.5)
    assert math.isnan(bacterial_only["auc"]) and math.isnan(bacterial_only["viral_specificity"])
    assert bacterial_only["n_viral"] == 0 and bacterial_only["bacterial_sensitivity"] == 1.0
