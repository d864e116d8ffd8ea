"""Int8 ONNX export: calibration on training images only, fidelity, and the default path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from pneumoscan.cli import app
from pneumoscan.constants import DEFAULT_MODEL_PATH, DEFAULT_ONNX_PATH
from pneumoscan.data.dataset import assign_validation_split, scan_dataset
from pneumoscan.data.preprocess import decode_to_uint8
from pneumoscan.inference.backends import open_model
from pneumoscan.inference.export import onnx_matches
from pneumoscan.inference.quantize import calibration_paths
from pneumoscan.inference.scorer import (
    OnnxModel,
    load_onnx_model,
    p_pneumonia,
    read_onnx_metadata,
)
from pneumoscan.models.modelfile import LoadedModel, load_model

from conftest import FIXTURES, SITE_SAMPLE, fixture_images

runner = CliRunner()


def _kaggle_layout(root: Path) -> Path:
    """The fixture X-rays as ``root/train/{NORMAL,PNEUMONIA}`` (symlinks)."""
    for label in ("NORMAL", "PNEUMONIA"):
        folder = root / "train" / label
        folder.mkdir(parents=True)
        for path in fixture_images(label):
            os.symlink(path, folder / path.name)
    return root


def test_calibration_images_come_from_the_training_split_only(tmp_path: Path) -> None:
    root = _kaggle_layout(tmp_path / "data")
    metadata = {"data": {"split": {"val_fraction": 0.25, "seed": 3}}}
    table = assign_validation_split(scan_dataset(root), 0.25, 3)
    validation = set(table.loc[table["split"] == "val", "path"].astype(str))
    training = set(table.loc[table["split"] == "train", "path"].astype(str))
    assert validation and training
    chosen = calibration_paths(root, metadata, n_images=1000, seed=0)
    assert set(chosen) == training  # all of them when asked for more than there are
    few = calibration_paths(root, metadata, n_images=8, seed=0)
    assert len(few) == 8 and not set(few) & validation
    assert few == calibration_paths(root, metadata, n_images=8, seed=0)
    assert few != calibration_paths(root, metadata, n_images=8, seed=1)


@pytest.fixture(scope="module")
def keras_model() -> LoadedModel:
    return load_model()


def _real_xrays() -> tuple[np.ndarray, np.ndarray]:
    paths = fixture_images("NORMAL") + fixture_images("PNEUMONIA")
    labels = [0] * len(fixture_images("NORMAL")) + [1] * len(fixture_images("PNEUMONIA"))
    for k, label in enumerate(("NORMAL", "PNEUMONIA")):  # another site, when present
        site = sorted((SITE_SAMPLE / label).glob("*.jpeg"))
        paths, labels = paths + site, labels + [k] * len(site)
    return np.stack([decode_to_uint8(p) for p in paths]), np.array(labels)


def test_shipped_int8_export_is_faithful(keras_model: LoadedModel) -> None:
    from sklearn.metrics import roc_auc_score

    int8 = load_onnx_model(DEFAULT_ONNX_PATH)
    assert onnx_matches(DEFAULT_ONNX_PATH, DEFAULT_MODEL_PATH), "rebuild the int8 export"
    quantization = int8.metadata["export"]["quantization"]
    assert quantization["calibration_images"] >= 200
    assert quantization["operating_point"].startswith("refitted on the validation split")
    # The int8 model's own threshold keeps the recorded validation sensitivity target.
    validation = int8.metadata["validation_metrics"]
    assert validation["sensitivity"] >= int8.metadata["target_sensitivity"]
    assert validation["auc"] >= quantization["float32_validation"]["auc"] - 0.002
    pixels, labels = _real_xrays()
    float_p = np.concatenate(
        [p_pneumonia(keras_model, pixels[i : i + 32]) for i in range(0, len(pixels), 32)]
    )
    int8_p = p_pneumonia(int8, pixels)
    assert np.abs(float_p - int8_p).mean() < 0.03
    assert np.mean((float_p >= keras_model.threshold) == (int8_p >= int8.threshold)) >= 0.9
    assert abs(roc_auc_score(labels, int8_p) - roc_auc_score(labels, float_p)) < 0.02


def test_cli_quantize_int8_writes_a_smaller_calibrated_file(tmp_path: Path) -> None:
    float_out, int8_out = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    result = runner.invoke(app, ["export", "--out", str(float_out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["export", "--quantize", "int8", "--calibration-data", str(FIXTURES),
         "--calibration-images", "16", "--out", str(int8_out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "calibrated on 16 training images" in result.output
    assert int8_out.stat().st_size < float_out.stat().st_size / 2
    ops = {node.op_type for node in onnx.load(str(int8_out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= ops
    properties = {p.key: p.value for p in onnx.load(str(int8_out)).metadata_props}
    export = json.loads(properties["pneumoscan.json"])["export"]
    # A bare class folder has no validation split: the float32 operating point is kept.
    assert export["quantization"]["operating_point"].startswith("the float32 model's")
    assert export["quantization"]["calibration_images"] == 16
    pixels, _ = _real_xrays()
    float_p = p_pneumonia(load_onnx_model(float_out), pixels[:32])
    assert np.abs(p_pneumonia(load_onnx_model(int8_out), pixels[:32]) - float_p).mean() < 0.05


def test_cli_quantize_errors(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--quantize", "int8", "--out", str(tmp_path / "m")])
    assert result.exit_code != 0 and "--calibration-data" in result.output
    result = runner.invoke(app, ["export", "--quantize", "int4", "--calibration-data", "x"])
    assert result.exit_code != 0 and "int4" in result.output


def test_auto_backend_takes_a_matching_saved_export(tmp_path: Path) -> None:
    model, network, _ = open_model(None, "auto")
    assert isinstance(model, OnnxModel) and network is None
    assert model.path == DEFAULT_ONNX_PATH
    # Heatmaps need the Keras network: auto falls back to Keras.
    model, network, _ = open_model(None, "auto", keras_network=True)
    assert isinstance(model, LoadedModel) and network is not None
    # A copy of the model without an export beside it runs on Keras ...
    copy = tmp_path / "copy.keras"
    shutil.copy(DEFAULT_MODEL_PATH, copy)
    assert isinstance(open_model(copy, "auto")[0], LoadedModel)
    # ... and an export of another model beside it is not taken.
    shutil.copy(DEFAULT_ONNX_PATH, tmp_path / "other.int8.onnx")
    other = tmp_path / "other.keras"
    shutil.copy(DEFAULT_MODEL_PATH, other)
    with other.open("ab") as handle:
        handle.write(b"\0")  # a different file: the recorded hash no longer matches
    assert isinstance(open_model(other, "auto")[0], LoadedModel)
    with pytest.raises(ValueError, match="unknown backend"):
        open_model(None, "tpu")


def test_evaluate_accepts_an_onnx_model(tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = runner.invoke(
        app,
        ["evaluate", str(FIXTURES), "--model", str(DEFAULT_ONNX_PATH), "--json", str(out),
         "--bootstrap", "50", "--plot", str(tmp_path / "cm.png")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())
    assert metrics["model"] == str(DEFAULT_ONNX_PATH) and metrics["n"] == 48
    assert metrics["auc"] > 0.8


def test_info_reads_an_onnx_export(tmp_path: Path) -> None:
    result = runner.invoke(app, ["info", "--model", str(DEFAULT_ONNX_PATH)])
    assert result.exit_code == 0, result.output
    assert '"quantization"' in result.output and '"threshold"' in result.output
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not onnx")
    result = runner.invoke(app, ["info", "--model", str(bogus)])
    assert result.exit_code != 0 and "bogus.onnx" in result.output


def test_int8_export_keeps_a_site_operating_point(trained_run: Path, tmp_path: Path) -> None:
    # A hospital calibrates, then exports for speed: its threshold (0.4932 here) was once
    # replaced by one refitted on our validation split, while the site's rule text stayed.
    from pneumoscan.models.modelfile import read_metadata, write_metadata

    data = _kaggle_layout(tmp_path / "data")
    site = tmp_path / "site.keras"
    site.write_bytes((trained_run / "model.keras").read_bytes())
    metadata = read_metadata(site)
    metadata["data"]["split"] |= {"val_fraction": 0.3}  # a val split the fixtures can hold
    write_metadata(site, metadata | {"threshold": 0.4932})
    validation_fitted = tmp_path / "val.int8.onnx"
    args = ["--quantize", "int8", "--calibration-data", str(data), "--calibration-images", "8"]
    result = runner.invoke(app, ["export", "--model", str(site), *args, "--out",
                                 str(validation_fitted)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert read_onnx_metadata(validation_fitted)["threshold"] != 0.4932  # refitted on val
    write_metadata(
        site,
        read_metadata(site)
        | {"threshold_fitted_on": "site sample", "site_calibration": {"n": 204}},
    )
    site_fitted = tmp_path / "site.int8.onnx"
    result = runner.invoke(app, ["export", "--model", str(site), *args, "--out",
                                 str(site_fitted)])  # fmt: skip
    assert result.exit_code == 0, result.output
    exported = read_onnx_metadata(site_fitted)
    assert exported["threshold"] == 0.4932
    assert exported["export"]["quantization"]["operating_point"].startswith("the site")


def test_onnx_metadata_is_read_without_the_onnx_package(tmp_path: Path) -> None:
    # `import onnx` cost predict half a second of start-up; the wire-format reader must give
    # exactly what onnx.load gives.
    import subprocess
    import sys

    from pneumoscan.errors import ModelFileError
    from pneumoscan.inference.scorer import onnx_metadata_props

    proto = onnx.load(str(DEFAULT_ONNX_PATH), load_external_data=False)
    expected = {p.key: p.value for p in proto.metadata_props}
    assert onnx_metadata_props(DEFAULT_ONNX_PATH) == expected
    assert read_onnx_metadata(DEFAULT_ONNX_PATH) == json.loads(expected["pneumoscan.json"])
    for damaged in (b"not an onnx file at all", DEFAULT_ONNX_PATH.read_bytes()[:5000]):
        (tmp_path / "bad.onnx").write_bytes(damaged)
        with pytest.raises(ModelFileError):
            read_onnx_metadata(tmp_path / "bad.onnx")
    probe = (
        "import sys; from pneumoscan.inference.backends import saved_export;"
        "from pneumoscan.constants import DEFAULT_MODEL_PATH as m;"
        "assert saved_export(m) is not None; print('onnx' in sys.modules)"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert loaded.stdout.strip() == "False", loaded.stderr
