"""Tests for site calibration (pneumoscan.calibrate) on real X-rays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumoscan.calibrate import calibrate_to_site, cross_validated_figures, sample_size_warning
from pneumoscan.cli import app
from pneumoscan.errors import DatasetError
from pneumoscan.modelfile import load_model, read_metadata

from conftest import FIXTURES, SITE_SAMPLE


def _site() -> Path:
    return SITE_SAMPLE if SITE_SAMPLE.is_dir() else FIXTURES


def test_calibration_refits_threshold_and_temperature_only(
    trained_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "site.keras"
    result = calibrate_to_site(trained_run, _site(), out, target_sensitivity=0.95)
    assert result["after"]["sensitivity"] >= 0.95
    metadata = read_metadata(out)
    assert metadata["threshold"] == result["threshold"]
    assert metadata["temperature"] == result["temperature"]
    assert metadata["site_calibration"]["n"] == result["n"]
    original, calibrated = load_model(trained_run), load_model(out)
    for a, b in zip(original.network.get_weights(), calibrated.network.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert read_metadata(trained_run / "model.keras")["threshold"] == original.threshold
    with pytest.raises(DatasetError, match="new file"):
        calibrate_to_site(out, _site(), out)


def test_cli_prints_before_after_and_warns_on_small_samples(
    trained_run: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        ["calibrate", "--model", str(trained_run), "--data", str(_site()),
         "--out", str(tmp_path / "m.keras"), "--json", str(tmp_path / "c.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "before" in text and "cross-validated" in text and "95% interval" in text
    figures = json.loads((tmp_path / "c.json").read_text())
    assert {"before", "after", "cross_validated", "temperature", "threshold"} <= set(figures)


def test_sample_size_warning_thresholds() -> None:
    assert sample_size_warning(62, 0.97) is not None  # the site sample: 89-99%
    assert sample_size_warning(2000, 0.97) is None


def test_cross_validation_holds_out_patients() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(60, int)]
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 100), 0.01, 0.99)
    patients = np.arange(100) // 2
    figures = cross_validated_figures(y, p, patients, target=0.9)
    assert figures is not None and figures["folds"] == 5
    assert 0.7 <= figures["sensitivity"] <= 1.0
