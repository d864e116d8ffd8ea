"""Tests for pneumoscan.evaluate.compare: paired AUC difference and its plain verdict."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from pneumoscan.cli import app
from pneumoscan.constants import DEFAULT_MODEL_PATH
from pneumoscan.evaluate.compare import verdict
from pneumoscan.metrics import paired_auc_difference

from conftest import FIXTURES


def _good_and_random(n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    y = np.arange(n) % 2
    return y, np.clip(0.6 * y + 0.4 * rng.random(n), 0, 1), rng.random(n)


def test_verdict_of_identical_models_is_no_difference() -> None:
    y, good, _ = _good_and_random()
    result = paired_auc_difference(y, good, good, n_resamples=300)
    text = verdict(result, "A (x)", "B (y)")
    assert text.startswith("no significant difference in ROC AUC between A (x) and B (y)")
    assert "+0.000" in text


def test_verdict_names_the_better_model_either_way() -> None:
    y, good, random = _good_and_random()
    assert verdict(paired_auc_difference(y, random, good, n_resamples=500)).startswith(
        "B has a higher ROC AUC than A"
    )
    assert verdict(paired_auc_difference(y, good, random, n_resamples=500)).startswith(
        "A has a higher ROC AUC than B"
    )


def test_verdict_when_auc_is_undefined() -> None:
    result = paired_auc_difference(np.ones(4), np.full(4, 0.5), np.full(4, 0.6), n_resamples=50)
    assert math.isnan(result["difference"])
    assert verdict(result).startswith("undefined")


def test_small_differences_on_few_images_are_not_significant() -> None:
    # Two decent scorers that differ only by noise, 60 images: the interval spans 0.
    rng = np.random.default_rng(11)
    y = np.arange(60) % 2
    base = 0.4 * y + 0.6 * rng.random(60)
    other = np.clip(base + rng.normal(0, 0.05, 60), 0, 1)
    result = paired_auc_difference(y, base, other, n_resamples=1000)
    assert result["ci"][0] < 0 < result["ci"][1] and not result["significant"]


def test_cli_compare_same_model_under_two_paths(tmp_path: Path) -> None:
    copy = tmp_path / "copy.keras"
    shutil.copy(DEFAULT_MODEL_PATH, copy)
    out_json = tmp_path / "compare.json"
    result = CliRunner().invoke(
        app,
        [
            "compare", str(DEFAULT_MODEL_PATH), str(copy), "--data", str(FIXTURES),
            "--json", str(out_json), "--bootstrap", "500",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "verdict: no significant difference" in text
    assert "sensitivity, bacteria" in text and "sensitivity, virus" in text
    comparison = json.loads(out_json.read_text())
    viral = comparison["a"]["per_subtype"]["virus"]
    assert viral["n"] == sum("virus" in p.name for p in FIXTURES.glob("PNEUMONIA/*"))
    assert viral["ci"][0] <= viral["sensitivity"] <= viral["ci"][1]
    assert comparison["n"] == 48 and comparison["split"] == "all"
    assert comparison["a"]["auc"] == comparison["b"]["auc"]
    assert comparison["auc_difference"]["difference"] == 0.0
    assert comparison["auc_difference"]["ci"] == [0.0, 0.0]
    assert comparison["model_b"] == str(copy)
