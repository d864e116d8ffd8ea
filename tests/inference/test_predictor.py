"""One predictor, one result (issue 18): every front door opens the model through
:class:`Predictor`, every output is made of :class:`Prediction` records in input order, with the
model's identity, and the words never contradict the number."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import pneumoscan
from pneumoscan.cli import app
from pneumoscan.constants import DEFAULT_ONNX_PATH, SAMPLES_DIR
from pneumoscan.data.preprocess import decode_image
from pneumoscan.errors import InvalidInputError
from pneumoscan.inference.explain import heatmap_title
from pneumoscan.inference.export import file_sha256
from pneumoscan.inference.prediction import (
    NEAR_THRESHOLD_TEXT,
    Prediction,
    near_threshold,
    op_score,
    reading,
)
from pneumoscan.inference.predictor import Predictor
from pneumoscan.inference.writers import read_results

from conftest import FIXTURES

runner = CliRunner()
SAMPLES = sorted(SAMPLES_DIR.glob("*/*.jpeg"))
#: The shipped sample that scores 0.715 on the int8 export and 0.708 on Keras.
IM_0031 = SAMPLES_DIR / "NORMAL" / "IM-0031-0001.jpeg"


def _text(output: str) -> str:
    """Console output with Rich's line wrapping undone."""
    return " ".join(output.split())


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.open()


def test_every_front_door_opens_the_same_predictor(predictor: Predictor) -> None:
    from pneumoscan.serve.engine import Engine

    model = pneumoscan.load()
    assert isinstance(model.predictor, Predictor)
    assert model.predictor.identity == predictor.identity
    assert predictor.identity.path == str(DEFAULT_ONNX_PATH) and predictor.backend == "onnx"
    assert predictor.identity.model_sha256 == file_sha256(DEFAULT_ONNX_PATH)
    engine = Engine(predictor, heatmaps=False)
    try:
        assert engine.identity == predictor.identity and engine.scorer is predictor.scorer()
    finally:
        engine.close()


def test_rows_keep_input_order_in_the_api_and_the_cli(tmp_path: Path) -> None:
    # Defect 1: missing files came first, and the summary counted 6 files for 7 inputs.
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    inputs = [
        str(SAMPLES[0]), str(tmp_path / "missing1.jpeg"), str(SAMPLES[1]), str(notes),
        str(SAMPLES[2]), str(tmp_path / "missing2.png"), str(SAMPLES[3]),
    ]  # fmt: skip
    table = pneumoscan.load().predict(inputs)
    assert table["path"].tolist() == inputs
    assert table["status"].tolist() == ["ok", "error", "ok", "error", "ok", "error", "ok"]
    out, document = tmp_path / "x.csv", tmp_path / "x.json"
    result = runner.invoke(
        app, ["predict", *inputs, "--out", str(out), "--json", str(document), "--sort", "input"]
    )
    assert result.exit_code == 0, result.output
    assert [r["path"] for r in read_results(out)] == inputs
    assert [r["path"] for r in json.loads(document.read_text())["results"]] == inputs
    assert "7 inputs" in _text(result.output)


def test_a_folder_keeps_its_problems_in_path_order(tmp_path: Path) -> None:
    root = tmp_path / "inbox"
    root.mkdir()
    shutil.copy(SAMPLES[0], root / "a.jpeg")
    (root / "b.jpeg").mkdir()  # an empty folder named like an image
    shutil.copy(SAMPLES[1], root / "c.jpeg")
    table = pneumoscan.load().predict(root)
    assert [Path(p).name for p in table["path"]] == ["a.jpeg", "b.jpeg", "c.jpeg"]
    assert table["status"].tolist() == ["ok", "error", "ok"]


def test_the_api_table_records_the_model_that_scored() -> None:
    # Defect 5: the DataFrame lacked threshold, model_sha256, pneumoscan_version, scored_at.
    model = pneumoscan.load()
    table = model.predict(SAMPLES[:2])
    sha = file_sha256(DEFAULT_ONNX_PATH)
    assert (table["model_sha256"] == sha).all() and table.attrs["model_sha256"] == sha
    assert (table["threshold"] == model.threshold).all()
    assert (table["pneumoscan_version"] == pneumoscan.__version__).all()
    assert table["scored_at"].str.endswith("+00:00").all()


def test_probabilities_keep_full_precision(predictor: Predictor) -> None:
    # Defect 6: rounding to 6 decimals tied 44 of 204 site images at 1.0 and lost ranking.
    decoded = [decode_image(path) for path in SAMPLES]
    results = predictor.predict_decoded(decoded)
    scorer = predictor.scorer()
    raw = scorer.forward(np.stack([d.pixels for d in decoded])).p_raw
    expected = scorer.calibrate(raw)
    assert [r.probability for r in results] == [float(p) for p in expected]


def test_predict_proba_warns_about_images_the_checks_would_reject() -> None:
    # Defect 6: a blank image scored 0.9986 with no warning.
    blank = np.full((224, 224), 128, np.uint8)
    model = pneumoscan.load()
    with pytest.warns(UserWarning, match="do not look like frontal chest X-rays"):
        proba = model.predict_proba([blank, np.asarray(Image.open(SAMPLES[0]))])
    assert proba.shape == (2, 2) and not np.isnan(proba).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict_proba(np.asarray(Image.open(SAMPLES[0])))


def test_entry_points_refuse_bad_values_with_one_error(tmp_path: Path) -> None:
    # Defect 6: --batch-size 0 failed deep in the model; train --intensity foo was a traceback.
    result = runner.invoke(app, ["predict", str(SAMPLES[0]), "--batch-size", "0"])
    assert result.exit_code == 2 and "batch size 0" in _text(result.output)
    with pytest.raises(InvalidInputError, match="batch size"):
        pneumoscan.load().predict(SAMPLES[0], batch_size=0)
    result = runner.invoke(
        app, ["train", "--data", str(FIXTURES), "--out", str(tmp_path / "r"), "--intensity", "foo"]
    )
    assert result.exit_code == 2 and "error:" in result.output and "foo" in result.output
    assert "xray_border" in _text(runner.invoke(app, ["train", "--help"]).output)  # defect 7


def test_long_tables_say_where_the_results_are(monkeypatch: pytest.MonkeyPatch) -> None:
    # Defect 6: more than 200 files printed no table and no hint.
    monkeypatch.setattr("pneumoscan.cli.scoring.MAX_TABLE_ROWS", 3)
    result = runner.invoke(app, ["predict", "--samples"])
    assert result.exit_code == 0, result.output
    assert "the table is printed for up to 3" in _text(result.output)


def test_the_words_follow_the_operating_point() -> None:
    # Defect 2: "No pneumonia detected" beside P 0.9111 (threshold 0.9201); a heatmap title
    # "P(pneumonia) 0.877 -> NORMAL".
    threshold = 0.9201
    assert op_score(threshold, threshold) == pytest.approx(0.5)
    assert op_score(0.9111, threshold) == pytest.approx(0.4951, abs=1e-4)
    assert op_score(0.0, threshold) == 0.0 and op_score(1.0, threshold) == 1.0
    scores = np.linspace(0, 1, 101)
    assert np.all(np.diff([op_score(p, threshold) for p in scores]) >= 0)  # order kept
    for p in (0.9111, 0.877, 0.95):
        assert near_threshold(p, threshold) and NEAR_THRESHOLD_TEXT in reading(p, threshold)
    assert not near_threshold(0.30, threshold) and not near_threshold(0.999, threshold)
    close = Prediction.scored(0.877, threshold)
    title = heatmap_title("IM-0001.jpeg", close)
    assert "read with care" in title and "-> NORMAL" not in title and "0.9201" in title
    assert close.decision == "NORMAL" and close.near_threshold and close.op_score < 0.5


def test_heatmaps_never_change_the_scores(tmp_path: Path) -> None:
    # Defect 3: --heatmaps switched scoring to Keras (IM-0031 0.7150 -> 0.7079, threshold
    # 0.9201 -> 0.9186).
    plain, drawn = tmp_path / "plain.csv", tmp_path / "drawn.csv"
    first = runner.invoke(app, ["predict", str(IM_0031), "--out", str(plain)])
    second = runner.invoke(
        app,
        ["predict", str(IM_0031), "--out", str(drawn), "--heatmaps", str(tmp_path / "maps")],
    )
    assert first.exit_code == 0 and second.exit_code == 0, second.output
    (a,), (b,) = read_results(plain), read_results(drawn)
    for key in ("probability", "threshold", "model_sha256", "decision"):
        assert a[key] == b[key], key
    assert b["heatmap"] and Image.open(b["heatmap"]).format == "PNG"
    # Defect 6: m.heatmap(out="cam.jpg") wrote PNG bytes into a .jpg file.
    model = pneumoscan.load()
    model.heatmap(IM_0031, out=tmp_path / "cam.jpg")
    assert Image.open(tmp_path / "cam.jpg").format == "JPEG"
    with pytest.raises(InvalidInputError, match=r"\.png, \.jpg or \.jpeg"):
        model.heatmap(IM_0031, out=tmp_path / "cam.gif")
    assert model.backend == "onnx"  # the network was loaded for the map, not for scoring


def test_info_prints_json_with_the_model_hash() -> None:
    # Defect 5: `info` printed a path line before its JSON and no SHA-256.
    result = runner.invoke(app, ["info", "--model", str(DEFAULT_ONNX_PATH)])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["model_file"]["sha256"] == file_sha256(DEFAULT_ONNX_PATH)
    assert shown["model_file"]["path"] == str(DEFAULT_ONNX_PATH) and "threshold" in shown


def test_evaluate_report_and_audit_describe_the_model_that_scores(tmp_path: Path) -> None:
    # Defect 4: `pneumoscan evaluate` and `audit-model` defaulted to the .keras model while
    # predict, the API and the service score on the int8 export; defect 5: no hash, no version.
    from pneumoscan.evaluate.shortcuts import audit_model

    out = tmp_path / "e.json"
    result = runner.invoke(
        app, ["evaluate", str(FIXTURES), "--json", str(out), "--bootstrap", "50"]
    )
    assert result.exit_code == 0, result.output
    cli = json.loads(out.read_text())
    api = pneumoscan.evaluate(pneumoscan.load(), FIXTURES, n_resamples=50)
    sha = file_sha256(DEFAULT_ONNX_PATH)
    assert cli["model"] == api["model"] == str(DEFAULT_ONNX_PATH)
    assert cli["model_sha256"] == api["model_sha256"] == sha
    assert cli["pneumoscan_version"] == api["pneumoscan_version"] == pneumoscan.__version__
    assert cli["specificity"] == api["specificity"] and cli["auc"] == api["auc"]
    audit = audit_model(FIXTURES, perturbations=["flip_horizontal"])
    assert audit["model"] == str(DEFAULT_ONNX_PATH) and audit["model_sha256"] == sha
