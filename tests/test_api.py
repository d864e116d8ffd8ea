"""The Python API (pneumoscan.load, Model, evaluate, samples): one answer per image everywhere.

The agreement test runs the same files through `pneumoscan predict --out`, Model.predict and
the web service's /v1/predict, and requires the same status, probability and decision.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import pneumoscan
from pneumoscan.cli import app as cli_app
from pneumoscan.constants import SAMPLES_DIR
from pneumoscan.data.pixels import as_uint8
from pneumoscan.data.preprocess import PreprocessConfig, decode_to_uint8, preprocess_image
from pneumoscan.errors import ImageReadError

from conftest import FIXTURES, REPO, SITE_SAMPLE, fixture_images

COLUMNS = [
    "path", "status", "probability", "decision", "near_threshold", "op_score", "p_viral",
    "subtype_estimate", "reason", "ood_score", "threshold", "model_sha256", "pneumoscan_version",
    "scored_at",
    "study_instance_uid", "series_instance_uid", "sop_instance_uid", "accession_number",
    "patient_id",
]  # fmt: skip


@pytest.fixture(scope="module")
def model() -> pneumoscan.Model:
    return pneumoscan.load()


def agreement_files() -> list[Path]:
    """The shipped samples plus, when the shared data is here, a few site-sample X-rays."""
    files = pneumoscan.samples()
    if SITE_SAMPLE.is_dir():
        for label in ("NORMAL", "PNEUMONIA"):
            files.extend(sorted((SITE_SAMPLE / label).glob("*.jpeg"))[:3])
    return files


def test_import_is_cheap_and_onnx_prediction_needs_no_tensorflow() -> None:
    code = (
        "import sys, pneumoscan; before = sorted(m for m in ('tensorflow', 'keras', "
        "'pandas', 'pneumoscan.api') if m in sys.modules); "
        "m = pneumoscan.load(); t = m.predict(pneumoscan.samples()); "
        "print(before, m.backend, len(t), 'tensorflow' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.split("\n")[-2] == "[] onnx 4 False", done.stderr


def test_samples_are_the_cli_samples() -> None:
    found = pneumoscan.samples()
    assert found == sorted(SAMPLES_DIR.glob("*/*.jpeg")) and len(found) == 4
    assert {p.parent.name for p in found} == {"NORMAL", "PNEUMONIA"}


def test_model_properties(model: pneumoscan.Model) -> None:
    assert model.backend == "onnx" and model.path.name.endswith(".int8.onnx")
    assert model.has_subtype is ("subtype" in model.metadata)
    assert model.classes == ("NORMAL", "PNEUMONIA")
    assert model.threshold == model.metadata["threshold"] and 0 < model.threshold < 1
    assert "onnx" in repr(model)


def test_predict_gives_one_readable_row_per_file(model: pneumoscan.Model) -> None:
    table = model.predict(pneumoscan.samples())
    assert isinstance(table, pd.DataFrame) and list(table.columns) == COLUMNS
    assert table["path"].tolist() == [str(p) for p in pneumoscan.samples()]
    assert (table["status"] == "ok").all()
    expected = np.where(table["probability"] >= model.threshold, "PNEUMONIA", "NORMAL")
    assert table["decision"].tolist() == expected.tolist()
    # Printed whole (no "..." hiding columns) so a notebook or terminal shows every value.
    printed = repr(table)
    assert "..." not in printed and all(column in printed for column in COLUMNS)
    assert table.attrs["backend"] == "onnx" and table.attrs["threshold"] == model.threshold


def test_folders_missing_files_and_non_images_get_rows(
    model: pneumoscan.Model, tmp_path: Path
) -> None:
    junk = tmp_path / "notes.jpeg"
    junk.write_text("not an image")
    table = model.predict([SAMPLES_DIR / "NORMAL", tmp_path / "missing.png", junk])
    by_status = table.groupby("status").size().to_dict()
    assert by_status == {"ok": 2, "error": 2}
    missing = table[table["path"] == str(tmp_path / "missing.png")].iloc[0]
    assert "no such file" in missing["reason"] and np.isnan(missing["probability"])


def test_in_memory_images_equal_their_files(model: pneumoscan.Model) -> None:
    files = pneumoscan.samples()
    from_files = model.predict(files)["probability"].to_numpy()
    # H×W grey arrays of the files (their channels are equal): three channels are made.
    arrays = [np.asarray(Image.open(p).convert("L")) for p in files]
    assert arrays[0].ndim == 2
    table = model.predict(arrays)
    assert list(table.columns) == ["index", *COLUMNS[1:]]
    np.testing.assert_allclose(table["probability"], from_files, atol=1e-6)
    # PIL images, one at a time.
    single = model.predict(Image.open(files[0]))
    assert single["probability"].iloc[0] == pytest.approx(from_files[0], abs=1e-6)
    # preprocess_image's float32 [0, 1] tensors, stacked N×H×W×3: converted back to uint8.
    config = PreprocessConfig.from_dict(model.metadata["preprocess"])
    batch = np.stack([preprocess_image(p, config) for p in files])
    assert batch.dtype == np.float32 and batch.shape[1:] == (224, 224, 3)
    np.testing.assert_allclose(model.predict(batch)["probability"], from_files, atol=1e-6)


def test_other_sizes_are_resized_like_files(model: pneumoscan.Model, tmp_path: Path) -> None:
    large = Image.open(pneumoscan.samples()[2]).convert("L").resize((450, 520))
    large.save(tmp_path / "large.png")
    from_file = model.predict(tmp_path / "large.png")["probability"].iloc[0]
    from_array = model.predict(np.asarray(large)[..., None])["probability"].iloc[0]
    assert from_array == pytest.approx(from_file, abs=1e-6)


def test_predict_proba_is_sklearn_shaped_and_agrees(model: pneumoscan.Model) -> None:
    files = pneumoscan.samples()
    proba = model.predict_proba(files)
    assert proba.shape == (4, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    positive = model.classes.index("PNEUMONIA")
    np.testing.assert_allclose(proba[:, positive], model.predict(files)["probability"])
    with pytest.raises(ImageReadError, match="could not be read"):
        model.predict_proba([files[0], SAMPLES_DIR / "missing.jpeg"])


@pytest.mark.parametrize(
    ("image", "error", "hint"),
    [
        (np.zeros((3, 224, 224), np.uint8), ValueError, "np.moveaxis"),
        (np.zeros((2, 3, 224, 224), np.uint8), ValueError, "np.moveaxis"),
        (np.full((224, 224), 300.5), ValueError, "rescale first"),
        (np.full((224, 224), np.nan), ValueError, "NaN"),
        (np.zeros((224, 224), bool), TypeError, "uint8"),
        (np.zeros((4, 4, 4, 4, 3), np.uint8), ValueError, "N×H×W×3"),
        (42, TypeError, "a PIL image or a uint8 array"),
        ([], ValueError, "no inputs"),
        ([SAMPLES_DIR, np.zeros((8, 8), np.uint8)], TypeError, "two calls"),
    ],
)
def test_wrong_inputs_raise_with_the_fix(
    model: pneumoscan.Model, image: object, error: type[Exception], hint: str
) -> None:
    with pytest.raises(error, match=hint):
        model.predict(image)  # type: ignore[arg-type]


def test_pixel_convention_converts_only_when_safe(xray_path: Path) -> None:
    pixels = decode_to_uint8(xray_path)
    assert np.array_equal(as_uint8(preprocess_image(xray_path)), pixels)
    assert np.array_equal(as_uint8(pixels.astype(np.int64)), pixels)
    with pytest.raises(ValueError, match="rescale"):
        as_uint8(pixels.astype(np.float32) - 10)
    # The low-level scorer takes preprocess_image's floats as well as uint8.
    from pneumoscan.inference.scorer import load_onnx_model, p_pneumonia

    onnx = load_onnx_model(pneumoscan.load().path)
    floats, ints = preprocess_image(xray_path)[None], pixels[None]
    assert p_pneumonia(onnx, floats) == pytest.approx(p_pneumonia(onnx, ints))


def test_high_bit_depth_arrays_are_read_like_16_bit_files(
    model: pneumoscan.Model, tmp_path: Path
) -> None:
    grey = np.asarray(Image.open(pneumoscan.samples()[0]).convert("L"), np.uint16) * 16
    png = tmp_path / "twelve-bit.png"
    Image.fromarray(grey).save(png)
    from_file = model.predict(png)["probability"].iloc[0]
    assert model.predict(grey)["probability"].iloc[0] == pytest.approx(from_file, abs=1e-6)


def test_evaluate_returns_what_the_cli_json_writes(model: pneumoscan.Model, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    done = CliRunner().invoke(
        cli_app,
        [
            "evaluate", str(FIXTURES), "--model", str(model.path), "--json", str(out),
            "--plot", str(tmp_path / "cm.png"), "--bootstrap", "200",
        ],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    metrics = pneumoscan.evaluate(model, FIXTURES, n_resamples=200)
    assert metrics == json.loads(out.read_text())
    assert metrics["n"] == len(fixture_images("NORMAL")) + len(fixture_images("PNEUMONIA"))


def test_evaluate_stays_callable_after_its_module_is_imported() -> None:
    import pneumoscan.evaluate as _  # noqa: F401  (binds the submodule on the package)

    assert callable(pneumoscan.evaluate)
    from pneumoscan.evaluate.scoring import score_images

    assert callable(score_images)


@pytest.fixture(scope="module")
def service() -> Iterator[TestClient]:
    """The service as `pneumoscan serve` builds it: its own defaults, no engine passed in."""
    from pneumoscan.serve.app import create_app

    with TestClient(create_app()) as client:
        deadline = time.monotonic() + 300
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.5)
        yield client


def test_cli_api_and_service_give_one_answer_per_image(
    model: pneumoscan.Model, service: TestClient, tmp_path: Path
) -> None:
    files = agreement_files()
    out = tmp_path / "predictions.csv"
    done = CliRunner().invoke(cli_app, ["predict", *map(str, files), "--out", str(out)])
    assert done.exit_code == 0, done.output
    with out.open(newline="") as handle:
        cli = {row["path"]: row for row in csv.DictReader(handle)}
    api = model.predict(files).set_index("path")
    body = service.post(
        "/v1/predict",
        files=[("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in files],
    ).json()
    web = body["results"]
    assert service.get("/v1/model").json()["backend"] == model.backend == "onnx"
    assert body["model"] == model.name
    assert [r["filename"] for r in web] == [p.name for p in files]
    for path, served in zip(files, web, strict=True):
        row, ours = cli[str(path)], api.loc[str(path)]
        assert row["status"] == ours["status"] == served["status"], path
        if served["status"] != "ok":
            continue
        assert float(row["probability"]) == pytest.approx(ours["probability"], abs=1e-6)
        assert served["probability"] == pytest.approx(ours["probability"], abs=1e-6)
        assert row["decision"] == ours["decision"] == served["decision"], path
    assert sum(r["status"] == "ok" for r in web) >= 4


def test_heatmap_loads_keras_lazily_and_draws(model: pneumoscan.Model, tmp_path: Path) -> None:
    target = tmp_path / "cam.png"
    cam = model.heatmap(pneumoscan.samples()[-1], out=target)
    assert cam.shape == (224, 224) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert target.read_bytes().startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="one image at a time"):
        model.heatmap(SAMPLES_DIR / "NORMAL")
    with pytest.raises(ValueError, match="unknown class"):
        model.heatmap(pneumoscan.samples()[0], class_name="COVID")


def test_quickstart_runs_on_a_small_labelled_folder(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, str(REPO / "examples" / "quickstart.py"), str(FIXTURES),
            "--out", str(tmp_path), "--bootstrap", "100",
        ],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PNEUMONIA" in done.stdout and "ROC AUC" in done.stdout
    assert (tmp_path / "heatmap.png").read_bytes().startswith(b"\x89PNG")


def test_a_failed_in_memory_image_is_named_by_its_own_index(model: pneumoscan.Model) -> None:
    small = np.zeros((64, 64), np.uint8)
    huge = np.zeros((8000, 8000), np.uint8)  # 64 megapixels: over the pixel budget
    table = model.predict([small, small, huge], batch_size=2)
    failed = table.iloc[2]
    assert failed["status"] == "error" and "image 2" in failed["reason"]
    assert "image 0" not in failed["reason"]


def test_a_subtype_head_fills_p_viral_and_the_estimate_for_pneumonia_only(
    model: pneumoscan.Model, subtype_model: Path, tmp_path: Path
) -> None:
    from pneumoscan.models.subtype import BACTERIAL, VIRAL

    subtyped = pneumoscan.load(subtype_model)
    assert subtyped.has_subtype
    junk = tmp_path / "notes.jpeg"
    junk.write_text("not an image")
    files = [*fixture_images("PNEUMONIA")[:3], *fixture_images("NORMAL")[:3], junk]
    table = subtyped.predict(files)
    assert list(table.columns) == COLUMNS and table["p_viral"].dtype == np.float64
    pneumonia = table[table["decision"] == "PNEUMONIA"]
    others = table[table["decision"] != "PNEUMONIA"]
    assert len(pneumonia) >= 2 and (others["decision"] == "NORMAL").sum() >= 2
    assert others["status"].tolist()[-1] == "error"
    assert pneumonia["p_viral"].between(0.0, 1.0).all()
    assert set(pneumonia["subtype_estimate"]) <= {BACTERIAL, VIRAL}
    # NORMAL decisions and unreadable files carry no estimate.
    assert others["p_viral"].isna().all() and others["subtype_estimate"].isna().all()
    # In-memory images get the same estimate as their files.
    arrays = [np.asarray(Image.open(p)) for p in files[:3]]
    np.testing.assert_allclose(
        subtyped.predict(arrays)["p_viral"], table["p_viral"].iloc[:3], atol=1e-6
    )
    # A model without a head has the columns, empty.
    if not model.has_subtype:
        plain = model.predict(files[:1])
        assert plain["p_viral"].isna().all() and plain["subtype_estimate"].isna().all()
