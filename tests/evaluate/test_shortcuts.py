"""Tests for the shortcut audit (pneumoscan.evaluate.shortcuts) on real X-rays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumoscan.cli import app
from pneumoscan.constants import DEFAULT_ONNX_PATH
from pneumoscan.data.pipeline import decode_all
from pneumoscan.data.preprocess import PreprocessConfig
from pneumoscan.errors import DatasetError
from pneumoscan.evaluate.shortcuts import PERTURBATIONS, audit_model, shift_statistics

from conftest import FIXTURES, fixture_images


def test_shift_statistics_hand_worked() -> None:
    y = np.array([0, 0, 1, 1])
    before = np.array([0.1, 0.4, 0.6, 0.9])
    after = np.array([0.3, 0.6, 0.6, 0.7])  # shifts +0.2, +0.2, 0, -0.2
    finding = shift_statistics("x", "test", y, before, after, 0.5, np.array(["a", "b", "c", "d"]))
    assert finding.mean_shift == pytest.approx(0.05)
    assert finding.mean_abs_shift == pytest.approx(0.15)
    assert finding.mean_shift_normal == pytest.approx(0.2)
    assert finding.mean_shift_pneumonia == pytest.approx(-0.1)
    assert finding.flipped == 1 and finding.flip_rate == 0.25  # 0.4 -> 0.6 crosses 0.5
    low, high = finding.mean_shift_ci
    assert low <= 0.05 <= high and low >= -0.2 and high <= 0.2


def test_no_shift_gives_a_zero_interval() -> None:
    p = np.linspace(0.1, 0.9, 6)
    finding = shift_statistics("x", "", np.r_[0, 0, 0, 1, 1, 1], p, p, 0.5, np.arange(6))
    assert finding.mean_shift == 0 and finding.mean_shift_ci == (0.0, 0.0) and finding.flipped == 0


def test_perturbations_change_only_what_they_name() -> None:
    pixels, _, _ = decode_all([str(fixture_images("NORMAL")[0])], PreprocessConfig())
    image = pixels[0]
    marked = PERTURBATIONS["marker_R_top_left"][1](image)
    changed = np.argwhere(np.any(marked != image, axis=-1))
    assert len(changed) > 20 and changed[:, 0].max() < 56 and changed[:, 1].max() < 56
    masked = PERTURBATIONS["border_masked"][1](image)
    assert masked[:10].max() == 0 and np.array_equal(masked[112, 20:200], image[112, 20:200])
    flipped = PERTURBATIONS["flip_horizontal"][1](image)
    assert np.array_equal(flipped[:, ::-1], image)
    for _, perturb in PERTURBATIONS.values():
        out = perturb(image)
        assert out.shape == image.shape and out.dtype == np.uint8


@pytest.mark.skipif(not DEFAULT_ONNX_PATH.is_file(), reason="the shipped int8 export is missing")
def test_cli_audits_the_shipped_model_on_real_xrays(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["audit-model", "--data", str(FIXTURES), "--model", str(DEFAULT_ONNX_PATH),
         "--perturbation", "border_masked", "--perturbation", "flip_horizontal",
         "--json", str(tmp_path / "a.json")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    audit = json.loads((tmp_path / "a.json").read_text())
    assert [f["name"] for f in audit["findings"]] == ["border_masked", "flip_horizontal"]
    assert audit["n"] == len(list(FIXTURES.glob("*/*.jpeg")))
    for finding in audit["findings"]:
        assert finding["mean_abs_shift"] > 0  # a real network never scores a change exactly 0
        assert finding["mean_shift_ci"][0] <= finding["mean_shift"] <= finding["mean_shift_ci"][1]
    assert "Shortcut audit on" in result.output


def test_unknown_perturbation_is_refused() -> None:
    with pytest.raises(DatasetError, match="unknown perturbation"):
        audit_model(FIXTURES, DEFAULT_ONNX_PATH, ["upside_down"])
