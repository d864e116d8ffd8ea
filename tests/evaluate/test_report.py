"""Tests for pneumoscan.evaluate.report: the self-contained HTML report, checked in headless
Chromium."""

from __future__ import annotations

import html
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from pneumoscan.cli import app
from pneumoscan.constants import DEFAULT_MODEL_PATH, DEFAULT_ONNX_PATH
from pneumoscan.evaluate.report import (
    build_report,
    calibration_reading,
    display,
    number,
    training_history,
    worst_errors,
)
from pneumoscan.evaluate.scoring import ScoredImages, subtype_in_sample
from pneumoscan.formatting import format_threshold
from pneumoscan.inference.export import file_sha256
from pneumoscan.models import modelfile
from pneumoscan.models.modelfile import OperatingPoint
from pneumoscan.models.subtype import SubtypeHead

from conftest import CHROMIUM, CHROMIUM_ARGS, FIXTURES, SITE_SAMPLE

SECTIONS = [
    "summary", "dataset", "training", "curves", "confusion", "calibration", "sweep", "subtypes",
    "errors", "model-card",
]  # fmt: skip
# The real images the report is made from: the hospital-like sample when the shared data is
# there, else the repository's fixture set.
REPORT_DATA = SITE_SAMPLE if SITE_SAMPLE.is_dir() else FIXTURES


@pytest.fixture(scope="module")
def site_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    """``pneumoscan report`` with the shipped model: (HTML path, JSON metrics, CLI output)."""
    folder = tmp_path_factory.mktemp("report")
    html_path, json_path = folder / "report.html", folder / "metrics.json"
    result = CliRunner().invoke(
        app,
        ["report", "--data", str(REPORT_DATA), "--out", str(html_path), "--json", str(json_path),
         "--model", str(DEFAULT_ONNX_PATH)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return html_path, json.loads(json_path.read_text()), result.output


def _lookup(metrics: dict[str, Any], key: str) -> Any:
    value: Any = metrics
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def test_worst_errors_puts_the_most_confident_mistakes_first() -> None:
    y = np.array([1, 1, 1, 0, 0, 0, 1])
    p = np.array([0.30, 0.01, 0.90, 0.60, 0.95, 0.10, 0.20])
    missed, alarms = worst_errors(y, p, 0.5)
    assert missed.tolist() == [1, 6, 0]  # P 0.01, 0.20, 0.30
    assert alarms.tolist() == [4, 3]  # P 0.95, 0.60
    assert worst_errors(y, p, 0.5, limit=1)[0].tolist() == [1]


def test_numbers_carry_their_json_path_and_exact_value() -> None:
    metrics = {"auc": 0.91234, "auc_ci": [0.8, float("nan")], "n": 100}
    assert number(metrics, "auc") == '<span data-key="auc" data-value="0.91234">0.912</span>'
    assert number(metrics, "n").endswith(">100</span>")
    assert 'data-value="null">n/a<' in number(metrics, "auc_ci.1")
    assert display(None) == "n/a" and display(3) == "3" and display(0.5) == "0.500"


def test_thresholds_never_round_to_one() -> None:
    from pneumoscan.formatting import format_probability, format_threshold

    assert number({"threshold": 0.9996}, "threshold").endswith(">0.9996</span>")
    assert number({"threshold": 0.99996}, "threshold").endswith(">0.99996</span>")
    assert number({"sweep": [{"threshold": 0.5}]}, "sweep.0.threshold").endswith(">0.5000</span>")
    assert format_threshold(0.787) == "0.7870" and format_threshold(0.00004) == "0.00004"
    assert format_threshold(1.0) == "1.0000" and format_threshold(None) == "n/a"
    assert format_probability(0.99951, 0.99996) == "0.99951"
    assert format_probability(0.25) == "0.250"


def test_intended_use_block_is_escaped_html() -> None:
    from pneumoscan.evaluate.report import INTENDED_USE_FILE, intended_use_html

    assert INTENDED_USE_FILE.is_file()  # shipped with the package (assets/*.md)
    block = intended_use_html("## For <you>\nA line\ncontinued.\n\n- one\n  more\n- two\n")
    assert block == (
        '<div id="intended-use"><h3>For &lt;you&gt;</h3><p>A line continued.</p>'
        "<ul><li>one more</li><li>two</li></ul></div>"
    )


def test_training_history_only_beside_a_run_folder_model(tmp_path: Path) -> None:
    assert training_history(DEFAULT_MODEL_PATH) is None
    (tmp_path / "history.csv").write_text("epoch,loss\n1,0.5\n")
    history = training_history(tmp_path / "model.keras")
    assert history is not None and list(history["loss"]) == [0.5]


def test_report_is_one_self_contained_file(site_report: tuple[Path, dict[str, Any], str]) -> None:
    html_path, metrics, output = site_report
    page = html_path.read_text(encoding="utf-8")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    images = re.findall(r"<img [^>]*src=\"([^\"]+)\"", page)
    assert len(images) >= 7 and all(src.startswith("data:image/png;base64,") for src in images)
    # Nothing to fetch: no external scripts, styles, images or links.
    assert not re.search(r"(src|href)=\"(https?:)?//", page)
    assert "<link" not in page and "@import" not in page
    assert "training history not available" in page  # the shipped model has no run folder
    embedded = re.search(r'<script type="application/json" id="metrics-json">(.*?)</script>', page)
    assert embedded is not None
    assert json.loads(embedded.group(1).replace("<\\/", "</")) == metrics
    assert f"n={metrics['n']}" in " ".join(output.split())
    assert "wrote" in output and str(html_path.name) in output
    # The model card carries the intended use and known limits.
    card = page[page.index('<section id="model-card">') :]
    assert '<div id="intended-use">' in card
    for heading in ("What it is for", "What it is not for", "Known limits"):
        assert f"<h3>{heading}</h3>" in card
    assert "not a diagnosis" in card and "Calibrate the threshold to each site" in card
    # Issue 18, defect 4: the report describes the int8 export that scores in predict, the API
    # and the service, with its hash and the pneumoscan version (defect 5).
    assert metrics["model"] == str(DEFAULT_ONNX_PATH) and metrics["backend"] == "onnx"
    assert metrics["model_sha256"] == file_sha256(DEFAULT_ONNX_PATH)
    assert metrics["model_sha256"] in card and metrics["pneumoscan_version"] in card
    # Defect 2: no calibration sentence the reliability table on the page contradicts.
    calibration = page[page.index('<section id="calibration">') : page.index('id="sweep"')]
    assert "8 of 10" not in calibration
    assert html.escape(calibration_reading(metrics)) in calibration


def test_report_of_a_run_folder_shows_its_training_curves(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").symlink_to(DEFAULT_MODEL_PATH)
    history = "epoch,loss,accuracy,val_loss,val_accuracy,val_auc\n1,0.4,0.8,0.3,0.9,0.95\n"
    (run / "history.csv").write_text(history + "2,0.2,0.9,0.25,0.92,0.97\n")
    result = build_report(tmp_path / "r.html", FIXTURES, model=run, n_resamples=200)
    page = result.path.read_text(encoding="utf-8")
    assert 'id="fig-training"' in page and "training history not available" not in page
    assert result.metrics["n"] == 48 and result.size_bytes == result.path.stat().st_size


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM}")
@pytest.mark.skipif(
    importlib.util.find_spec("playwright") is None,
    reason="needs the playwright package (pip install -e '.[test]')",
)
def test_report_renders_in_headless_chromium(
    site_report: tuple[Path, dict[str, Any], str],
) -> None:
    from playwright.sync_api import sync_playwright

    html_path, metrics, _ = site_report
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(html_path.resolve().as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.id, e.complete, e.naturalWidth, e.naturalHeight])"
            )
            shown = page.eval_on_selector_all(
                "[data-key]",
                "els => els.map(e => [e.dataset.key, e.dataset.value, e.textContent])",
            )
            summary = page.inner_text("#key-metrics")
        finally:
            browser.close()
    assert len(images) >= 7
    for image_id, complete, width, height in images:
        assert complete and width > 0 and height > 0, image_id
    keys = {key for key, _, _ in shown}
    assert {"auc", "auc_ci.0", "auc_ci.1", "sensitivity", "specificity", "n"} <= keys
    assert {"confusion_matrix.0.0", "confusion_matrix.1.1", "ece", "brier"} <= keys
    for key, value, text in shown:
        expected = _lookup(metrics, key)
        assert json.loads(value) == expected, key
        # Thresholds show as many decimals as they need, every other number three.
        shown = format_threshold(expected) if key.endswith("threshold") else display(expected)
        assert text == shown, key
    assert display(metrics["auc"]) in summary and display(metrics["sensitivity"]) in summary


def test_report_copes_with_one_class_only(tmp_path: Path) -> None:
    # Only NORMAL images: AUC and sensitivity are undefined, nothing can be missed; no crash.
    data = tmp_path / "normals"
    (data / "NORMAL").mkdir(parents=True)
    (data / "PNEUMONIA").mkdir()
    for path in sorted((FIXTURES / "NORMAL").glob("*.jpeg"))[:4]:
        shutil.copy(path, data / "NORMAL")
    result = build_report(tmp_path / "r.html", data, n_resamples=100)
    page = result.path.read_text(encoding="utf-8")
    assert result.metrics["n"] == 4 and math.isnan(result.metrics["auc"])
    assert "No pneumonia images." in page and "None at this threshold." in page
    assert 'data-key="auc" data-value="null">n/a<' in page


def test_error_gallery_carries_gradcam_maps(trained_run: Path) -> None:
    from pneumoscan.evaluate.report import _thumbnails
    from pneumoscan.models.modelfile import load_model

    from conftest import fixture_images

    paths = [str(p) for p in fixture_images("PNEUMONIA")[:2]]
    model = load_model(trained_run)
    images, maps = _thumbnails(model.preprocess, model.network, paths, np.array([0, 1]))
    assert [image.shape for image in images] == [(224, 224)] * 2
    assert all(m is not None and m.shape == (224, 224) and np.isfinite(m).all() for m in maps)
    assert all(float(m.min()) >= 0.0 and float(m.max()) <= 1.0 for m in maps if m is not None)


def test_report_adds_the_shortcut_audit_and_sources_when_asked(tmp_path: Path) -> None:
    result = build_report(tmp_path / "r.html", FIXTURES, n_resamples=100, shortcut_audit=True)
    page = result.path.read_text()
    assert '<section id="shortcuts">' in page and '<section id="sources">' in page
    assert page.count("<tr>", page.index('id="shortcuts"')) >= 8  # one row per perturbation
    assert "outer 8% of each side set to black" in page
    plain = build_report(tmp_path / "p.html", FIXTURES, n_resamples=100).path.read_text()
    assert '<section id="shortcuts">' not in plain


def _bins(rows: list[tuple[int, float, float, float]]) -> dict[str, Any]:
    """Metrics with calibration bins of ``(n, mean predicted, ci_low, ci_high)``."""
    return {
        "calibration_bins": [
            {"bin_low": i / 10, "bin_high": (i + 1) / 10, "n": n, "mean_predicted": mean,
             "ci_low": low, "ci_high": high}
            for i, (n, mean, low, high) in enumerate(rows)
        ]
    }  # fmt: skip


def test_calibration_reading_follows_the_table_on_the_page() -> None:
    # Issue 18, defect 2: the report said P 0.8 meant pneumonia in about 8 of 10 such images
    # while its own table showed otherwise (ECE 0.127 on site_sample).
    contradicted = _bins([(40, 0.05, 0.0, 0.1), (0, 0.0, 0.0, 0.0), (30, 0.85, 0.2, 0.6)])
    text = calibration_reading(contradicted)
    assert "not a frequency" in text and "0.2–0.3" in text and "8 of 10" not in text
    assert "No image scored in 1 of the 3 bins" in text
    agreeing = _bins([(40, 0.05, 0.0, 0.1), (30, 0.85, 0.7, 0.95)])
    assert "can be read as a frequency" in calibration_reading(agreeing)


def test_a_site_calibrated_model_on_its_own_sample_says_so(
    trained_run: Path, tmp_path: Path
) -> None:
    # evaluate and report showed a calibrated model's in-sample figures (0.969 / 0.922) as if
    # they were what a new image would get, and the card did not mention the calibration.
    from pneumoscan.evaluate.scoring import evaluate
    from pneumoscan.train.site import calibrate_to_site

    site = tmp_path / "site.keras"
    result = calibrate_to_site(
        trained_run, FIXTURES, site, target_sensitivity=0.9, refit_head=False, export=False
    )
    metrics = evaluate(FIXTURES, model=site, n_resamples=100)
    found = metrics["calibration_sample"]
    assert found["overlap"] == found["n"] == metrics["n"]
    assert found["expected"]["sensitivity"] == result["cross_validated"]["sensitivity"]
    page = build_report(tmp_path / "r.html", FIXTURES, model=site, n_resamples=100)
    text = page.path.read_text()
    assert 'id="calibration-sample"' in text and "in-sample" in text
    assert "site calibration" in text and "expected on new images" in text
    # The same model on images it was not calibrated on carries no such warning.
    other = tmp_path / "other"
    for label in ("NORMAL", "PNEUMONIA"):
        (other / label).mkdir(parents=True)
        for path in sorted(FIXTURES.glob(f"{label}/*.jpeg"))[:3]:
            flipped = Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            flipped.save(other / label / path.name)
    assert evaluate(other, model=site, n_resamples=100)["calibration_sample"] is None


def _subtype_subset(folder: Path) -> Path:
    """A few real normals and bacterial and viral pneumonias of the report's data."""
    for label, patterns in (("NORMAL", ["*.jpeg"]), ("PNEUMONIA", ["*bacteria*", "*virus*"])):
        (folder / label).mkdir(parents=True)
        for pattern in patterns:
            for path in sorted((REPORT_DATA / label).glob(pattern))[:4]:
                shutil.copy(path, folder / label / path.name)
    return folder


def test_report_of_a_subtype_model_shows_the_head_with_its_limits(
    subtype_model: Path, tmp_path: Path
) -> None:
    data = _subtype_subset(tmp_path / "named")
    result = build_report(
        tmp_path / "r.html", data, model=subtype_model, n_resamples=100, max_errors=1
    )
    page = result.path.read_text(encoding="utf-8")
    block = result.metrics["subtype"]
    assert (block["n_bacterial"], block["n_viral"]) == (4, 4) and block["in_sample"] is None
    section = page[page.index('<section id="subtype-estimate">') :]
    section = section[: section.index("</section>")]
    assert "estimate, not a microbiological diagnosis" in section
    assert "whatever the pneumonia decision" in section and "In-sample" not in section
    figure = re.search(r'<img id="fig-subtype-roc" src="([^"]+)"', section)
    assert figure is not None and figure.group(1).startswith("data:image/png;base64,")
    shown = dict(re.findall(r'data-key="(subtype\.[^"]+)" data-value="([^"]*)"', section))
    for key in ("auc", "auc_ci.0", "bacterial_sensitivity", "viral_specificity_ci.1", "ece"):
        assert json.loads(html.unescape(shown[f"subtype.{key}"])) == _lookup(
            result.metrics, f"subtype.{key}"
        ), key
    assert shown["subtype.confusion_matrix.1.1"] == str(block["confusion_matrix"][1][1])
    card = page[page.index('<section id="model-card">') :]
    limits = card[card.index('<div id="subtype-limits">') :]
    for words in ("not a microbiological diagnosis", "file names", "Co-infection", "one hospital"):
        assert words in limits, words
    assert "subtype estimate" in card and "on P(bacterial)" in card


def _named_scored(split: str, head: SubtypeHead) -> ScoredImages:
    table = pd.DataFrame(
        {"path": ["a/person1_bacteria_1.jpeg", "a/person2_virus_1.jpeg"],
         "label": ["PNEUMONIA"] * 2, "patient_id": ["person1", "person2"],
         "subtype": ["bacteria", "virus"], "p_viral": [0.2, 0.7]}
    )  # fmt: skip
    return ScoredImages(table, np.array([0.9, 0.9]), [], "a", split, "m.keras", 0.5, subtype=head)


def test_subtype_figures_are_flagged_in_sample_where_the_head_was_fitted() -> None:
    from pneumoscan.evaluate.report import _subtype_estimate
    from pneumoscan.evaluate.scoring import summarise

    validation = SubtypeHead(
        np.zeros(2), 0.0, OperatingPoint(0.5, fitted_on=modelfile.VALIDATION_SPLIT), {}, {}
    )
    site = SubtypeHead(
        np.zeros(2), 0.0, OperatingPoint(0.5, fitted_on=modelfile.SITE_SAMPLE), {}, {}
    )
    found = {"overlap": 2, "n": 2}
    # The head's own validation pneumonias, or the site sample it was calibrated on.
    assert "validation" in str(subtype_in_sample(_named_scored("val", validation), None))
    assert "site-calibration" in str(subtype_in_sample(_named_scored("all", site), found))
    # A site sample the head was not calibrated on, or a test split: out of sample.
    assert subtype_in_sample(_named_scored("all", validation), found) is None
    assert subtype_in_sample(_named_scored("test", validation), None) is None
    scored = _named_scored("val", validation)
    metrics = summarise(scored, n_resamples=20)
    metrics["subtype"]["in_sample"] = subtype_in_sample(scored, None)
    section = _subtype_estimate(metrics, scored, {"subtype": {}}, {})
    assert 'id="subtype-in-sample"' in section and "in-sample and optimistic" in section
