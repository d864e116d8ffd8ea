"""Tests for the site promise's split check (pneumoscan.train.promise)."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.train.promise import (
    MAX_FAILURE_RATE,
    choose_rule,
    patient_splits,
    pneumonia_images_needed,
    split_check,
    support_warning,
)


def _overlapping_scores(seed: int = 0) -> tuple[np.ndarray, ...]:
    """A sample shaped like site_sample (77 normal, 72 bacterial, 55 viral; two images per
    patient) whose viral cases look more like normals, as at the new site."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(77, int), np.ones(127, int)]
    subtypes = np.array(["normal"] * 77 + ["bacteria"] * 72 + ["virus"] * 55)
    shift = np.select([subtypes == "bacteria", subtypes == "virus"], [3.5, 2.2], 0.0)
    p = 1 / (1 + np.exp(-(rng.normal(-1, 1, len(y)) + shift)))
    return y, p, np.arange(len(y)) // 2, subtypes


def test_splits_keep_patients_whole_and_cover_both_halves() -> None:
    y, _, patients, _ = _overlapping_scores()
    splits = patient_splits(y, patients, repeats=3)
    assert len(splits) == 6
    for calibration, check in splits:
        assert not set(patients[calibration]) & set(patients[check])
        assert len(calibration) + len(check) == len(y)
        assert y[check].sum() > 0 and (1 - y[check]).sum() > 0


def test_a_wider_margin_fails_less_and_costs_specificity() -> None:
    y, p, patients, subtypes = _overlapping_scores()
    checks = split_check(
        y, p, patients, subtypes, 0.95, confidences=(0.5, 0.8, 0.95), repeats=20
    )
    plain, margin, wide = checks
    # The plain rule (no margin) is fitted to the very images it is judged on: it falls short
    # in about half of the splits.
    assert plain.failure_rate > 0.3
    assert plain.failure_rate >= margin.failure_rate >= wide.failure_rate
    assert plain.specificity >= margin.specificity >= wide.specificity
    assert set(plain.per_subtype) == {"bacteria", "virus"}
    # The viral cases are the harder ones: they fall short more often.
    by_subtype = plain.per_subtype
    assert by_subtype["virus"]["failure_rate"] > by_subtype["bacteria"]["failure_rate"]
    chosen, supported = choose_rule(checks)
    if supported:
        assert chosen.failure_rate <= MAX_FAILURE_RATE
        looser = [c for c in checks if c.confidence < chosen.confidence]
        assert all(c.failure_rate > MAX_FAILURE_RATE for c in looser)
    else:
        assert chosen is wide


def test_an_unsupported_promise_says_how_many_images_would_help() -> None:
    y, p, patients, subtypes = _overlapping_scores()
    (check,) = split_check(y, p, patients, subtypes, 0.99, confidences=(0.5,), repeats=5)
    message = support_warning(check, False, 0.99, 127, expected_specificity=0.5)
    assert message is not None and "pneumonia images" in message and "label about" in message
    assert support_warning(check, True, 0.99, 127, expected_specificity=0.95) is None
    needed = [pneumonia_images_needed(target) for target in (0.9, 0.95, 0.97)]
    assert needed == sorted(needed) and len(set(needed)) == 3
    with pytest.raises(ValueError):
        split_check(y, p, patients, subtypes, 1.5, confidences=(0.5,), repeats=1)
