"""End-to-end tests of the CLI on real X-rays: train -> evaluate -> predict, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pneumoscan.cli import app

from conftest import FIXTURES, SITE_SAMPLE, fixture_images, needs_shared

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_train_evaluate_predict_chain(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = invoke(
        "train", "--data", FIXTURES, "--out", run, "--epochs", "1", "--val-fraction", "0.25"
    )
    assert code == 0, out
    assert "not a test score" in out and (run / "model.keras").exists()

    report = tmp_path / "eval.json"
    code, out = invoke(
        "evaluate", FIXTURES, "--model", run, "--json", report, "--plot", tmp_path / "cm.png"
    )
    assert code == 0, out
    metrics = json.loads(report.read_text())
    assert metrics["n"] == 48
    assert {
        "auc",
        "accuracy",
        "sensitivity",
        "specificity",
        "threshold",
        "confusion_matrix",
    } <= set(metrics)
    assert sum(map(sum, metrics["confusion_matrix"])) == 48
    assert "precision" in out and "recall" in out and "f1-score" in out
    assert (tmp_path / "cm.png").stat().st_size > 5_000

    predictions = tmp_path / "pred.json"
    code, out = invoke("predict", FIXTURES / "NORMAL", "--model", run, "--json", predictions)
    assert code == 0, out
    results = json.loads(predictions.read_text())["results"]
    assert len(results) == len(fixture_images("NORMAL"))
    assert all(r["status"] == "ok" and 0.0 <= r["probability"] <= 1.0 for r in results)
    assert {r["decision"] for r in results} <= {"NORMAL", "PNEUMONIA"}


def test_predict_lists_bad_files_and_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(fixture_images("PNEUMONIA")[0], folder / "scan.dat")  # any extension is tried
    (folder / "empty.jpeg").write_bytes(b"")
    (folder / "notes.txt").write_text("hello")
    good = fixture_images("NORMAL")[0].read_bytes()
    (folder / "cut.jpeg").write_bytes(good[: len(good) // 3])
    out_json = tmp_path / "pred.json"
    code, out = invoke("predict", folder, tmp_path / "missing.png", "--json", out_json)
    assert code == 0, out
    results = {Path(r["path"]).name: r for r in json.loads(out_json.read_text())["results"]}
    assert results["scan.dat"]["status"] == "ok"
    assert "empty file" in results["empty.jpeg"]["error"]
    assert "not an image" in results["notes.txt"]["error"]
    assert "truncated" in results["cut.jpeg"]["error"]
    assert "no such file" in results["missing.png"]["error"]
    assert all(r["probability"] is None for r in results.values() if r["status"] == "error")


def test_predict_fails_only_when_nothing_is_usable(tmp_path: Path) -> None:
    (tmp_path / "a.jpeg").write_text("text")
    code, out = invoke("predict", tmp_path / "a.jpeg")
    assert code == 1 and "no input could be read" in out


def test_shipped_model_predicts_the_shipped_samples(tmp_path: Path) -> None:
    out_json = tmp_path / "pred.json"
    code, out = invoke("predict", "--samples", "--json", out_json)
    assert code == 0, out
    results = json.loads(out_json.read_text())["results"]
    assert len(results) == 4 and all(r["status"] == "ok" for r in results)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("evaluate", "/nonexistent/folder"), "no such folder"),
        (("evaluate", "--data", "/nonexistent/folder"), "no such folder"),
        (("evaluate",), "give the data set once"),
        (("evaluate", str(FIXTURES), "--data", str(FIXTURES)), "give the data set once"),
        (("train", "--data", "/nonexistent/folder", "--out", "/tmp/x"), "no such folder"),
        (("evaluate", str(FIXTURES), "--model", "/nonexistent.keras"), "model file not found"),
        (("train", "--data", str(FIXTURES), "--arch", "vgg99"), "unknown architecture"),
    ],
)
def test_bad_arguments_give_one_clear_error(args: tuple[str, ...], message: str) -> None:
    code, out = invoke(*args)
    assert code == 2 and message in " ".join(out.split())


def test_evaluate_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    shutil.copy(fixture_images("NORMAL")[0], tmp_path / "images")
    code, out = invoke("evaluate", tmp_path)
    assert code == 2 and "no NORMAL/ or PNEUMONIA/" in " ".join(out.split())


def test_info_and_models() -> None:
    code, out = invoke("info")
    assert code == 0 and '"threshold"' in out
    # The shipped subtype head's 1,280 weights are summarised, not printed one per line.
    assert '"1280 numbers (in the file)"' in out and len(out.splitlines()) < 400
    code, out = invoke("models")
    assert code == 0 and "seed" in out


@needs_shared
def test_audit_on_the_site_sample(tmp_path: Path) -> None:
    code, out = invoke("audit", SITE_SAMPLE, "--out", tmp_path)
    assert code == 0, out
    audit = json.loads((tmp_path / "audit.json").read_text())
    on_disk = {
        label: sum(1 for f in (SITE_SAMPLE / label).iterdir() if f.is_file())
        for label in ("NORMAL", "PNEUMONIA")
    }
    assert audit["counts"]["by_label"] == on_disk
    assert (tmp_path / "class_balance.png").exists() and (tmp_path / "sample_grid.png").exists()


@needs_shared
def test_evaluate_recreates_the_models_validation_split(tmp_path: Path) -> None:
    import pandas as pd

    from pneumoscan.constants import DEFAULT_MODEL_PATH
    from pneumoscan.models.modelfile import read_metadata

    out_json = tmp_path / "val.json"
    data = SITE_SAMPLE.parent / "chest_xray"
    code, out = invoke(
        "evaluate", data, "--split", "val", "--json", out_json, "--plot", tmp_path / "c.png"
    )
    assert code == 0, out
    recorded = read_metadata(DEFAULT_MODEL_PATH)["data"]["split"]["counts"]
    n_val = sum(n for key, n in recorded.items() if key.startswith("val/"))
    assert json.loads(out_json.read_text())["n"] == n_val
    assert pd.notna(json.loads(out_json.read_text())["auc"])


def test_tensorflow_start_up_lines_are_silenced() -> None:
    """`import pneumoscan` loads no TensorFlow, and TensorFlow's start-up lines (oneDNN, absl)
    stay off stderr when it loads; other stderr output still gets through."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, pneumoscan; assert 'tensorflow' not in sys.modules; "
        "import os; print(os.environ['TF_CPP_MIN_LOG_LEVEL']); "
        "import keras; print('after keras', file=sys.stderr)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2"]
    assert "oneDNN" not in done.stderr and "absl::InitializeLog" not in done.stderr
    assert "after keras" in done.stderr
    # A user who asks for TensorFlow's log keeps it.
    check = "import sys, pneumoscan._quiet_tf as q; print(q._FINDER in sys.meta_path)"
    loud = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60,
        env=env | {"TF_CPP_MIN_LOG_LEVEL": "0"},
    )  # fmt: skip
    assert loud.stdout.split() == ["False"], loud.stderr


def test_keep_drops_only_the_known_start_up_lines() -> None:
    from pneumoscan._quiet_tf import keep

    assert not keep("I0000 00:00:17.8 11337 port.cc:153] oneDNN custom operations are on.")
    assert not keep("WARNING: All log messages before absl::InitializeLog() is called are ...")
    assert keep("Traceback (most recent call last):") and keep("UserWarning: something")


def test_evaluate_takes_the_data_set_as_argument_or_as_data(tmp_path: Path) -> None:
    """`evaluate DATA` and `evaluate --data DATA` (as compare and report take it) agree."""
    runs = {}
    for name, where in (("argument", [FIXTURES]), ("option", ["--data", FIXTURES])):
        out = tmp_path / f"{name}.json"
        code, text = invoke("evaluate", *where, "--bootstrap", "50", "--json", out)
        assert code == 0, text
        runs[name] = json.loads(out.read_text())
    for key in ("n", "auc", "sensitivity", "specificity", "confusion_matrix", "data"):
        assert runs["argument"][key] == runs["option"][key]
