"""ONNX export and the ONNX Runtime backend: same probabilities as Keras on real X-rays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumoscan.cli import app
from pneumoscan.constants import DEFAULT_MODEL_PATH
from pneumoscan.data.preprocess import decode_to_uint8
from pneumoscan.inference.backends import open_model
from pneumoscan.inference.export import export_onnx, onnx_matches
from pneumoscan.inference.predict import load_detector, predict_files
from pneumoscan.inference.scorer import OnnxModel, Scorer, load_onnx_model, p_pneumonia
from pneumoscan.models.modelfile import LoadedModel, load_model

from conftest import FIXTURES, SITE_SAMPLE, fixture_images

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped model exported through the CLI."""
    out = tmp_path_factory.mktemp("onnx") / "shipped.onnx"
    result = runner.invoke(app, ["export", "--format", "onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "OOD detector included" in " ".join(result.output.split())
    return out


@pytest.fixture(scope="module")
def keras_model() -> LoadedModel:
    return load_model()


def _real_xrays() -> np.ndarray:
    paths = fixture_images("NORMAL") + fixture_images("PNEUMONIA")
    paths += sorted(SITE_SAMPLE.glob("*/*.jpeg"))[:32]  # another site, when present
    return np.stack([decode_to_uint8(p) for p in paths])


def test_onnx_probabilities_match_keras(exported: Path, keras_model: LoadedModel) -> None:
    onnx_model = load_onnx_model(exported)
    detector = load_detector(keras_model)
    assert detector is not None
    scorers = Scorer(keras_model, detector.layers), Scorer(onnx_model, detector.layers)
    pixels = _real_xrays()
    for start in range(0, len(pixels), 16):  # batches of 16 keep the feature maps small
        batch = pixels[start : start + 16]
        keras_p, onnx_p = p_pneumonia(keras_model, batch), p_pneumonia(onnx_model, batch)
        assert np.abs(keras_p - onnx_p).max() < 1e-4
        keras_pass, onnx_pass = (scorer.forward(batch) for scorer in scorers)
        assert np.abs(keras_pass.p_raw - onnx_pass.p_raw).max() < 1e-4
        assert keras_pass.features is not None and onnx_pass.features is not None
        np.testing.assert_allclose(onnx_pass.features, keras_pass.features, rtol=1e-4, atol=1e-4)


def test_onnx_file_is_self_contained(exported: Path, keras_model: LoadedModel) -> None:
    onnx_model = load_onnx_model(exported)
    assert onnx_model.threshold == keras_model.threshold
    assert onnx_model.temperature == keras_model.temperature
    assert onnx_model.preprocess == keras_model.preprocess
    assert onnx_model.metadata["export"]["outputs"] == ["probabilities", "ood_features"]
    assert load_detector(onnx_model) is not None
    assert onnx_matches(exported, DEFAULT_MODEL_PATH)
    assert not onnx_matches(exported, FIXTURES / "NORMAL" / fixture_images("NORMAL")[0].name)


def test_temperature_is_applied_on_both_backends(tmp_path: Path) -> None:
    from pneumoscan.models.modelfile import read_metadata, write_metadata

    hot = tmp_path / "hot.keras"
    hot.write_bytes(DEFAULT_MODEL_PATH.read_bytes())
    write_metadata(hot, read_metadata(hot) | {"temperature": 3.0})
    export_onnx(hot, tmp_path / "hot.onnx")
    pixels = np.stack([decode_to_uint8(p) for p in fixture_images("PNEUMONIA")[:6]])
    keras_p = p_pneumonia(load_model(hot), pixels)
    onnx_p = p_pneumonia(load_onnx_model(tmp_path / "hot.onnx"), pixels)
    plain = p_pneumonia(load_model(), pixels)
    assert np.abs(keras_p - onnx_p).max() < 1e-4
    assert np.abs(keras_p - 0.5).max() < np.abs(plain - 0.5).max()  # softened


def test_predict_results_agree_across_backends(exported: Path, keras_model: LoadedModel) -> None:
    files = [str(p) for p in fixture_images("PNEUMONIA")]
    onnx_model, _, note = open_model(exported)
    assert isinstance(onnx_model, OnnxModel) and note is None
    by_keras = list(predict_files(keras_model, files))
    by_onnx = list(predict_files(onnx_model, files))
    assert [r.status for r in by_keras] == [r.status for r in by_onnx]
    for a, b in zip(by_keras, by_onnx, strict=True):
        assert abs((a.probability or 0) - (b.probability or 0)) < 1e-4
        assert abs(a.ood_score - b.ood_score) < 1e-3


def test_cli_backend_onnx(exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred.json"
    result = runner.invoke(
        app,
        ["predict", str(FIXTURES / "NORMAL"), "--backend", "onnx", "--onnx", str(exported),
         "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "onnx" in result.output and "images/s" in result.output
    results = json.loads(out.read_text())["results"]
    assert len(results) == 24 and sum(r["status"] == "ok" for r in results) >= 23
    refused = runner.invoke(app, ["predict", str(FIXTURES), "-m", str(exported), "--heatmaps", "h"])
    assert refused.exit_code == 2 and "Keras model" in " ".join(refused.output.split())
    unknown = runner.invoke(app, ["export", "--format", "tflite", "--out", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "unknown format" in unknown.output


def test_export_writes_beside_the_model_where_predict_finds_it(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import pneumoscan.inference.export
    from pneumoscan.inference.backends import saved_export
    from pneumoscan.inference.export import default_export_path

    model = tmp_path / "run" / "model.keras"
    model.parent.mkdir()
    shutil.copy(DEFAULT_MODEL_PATH, model)
    assert default_export_path(model) == tmp_path / "run" / "model.onnx"
    assert default_export_path(model, "int8") == tmp_path / "run" / "model.int8.onnx"
    # The shipped model's folder is the installed package: its export goes to this folder.
    assert default_export_path(DEFAULT_MODEL_PATH) == Path(DEFAULT_MODEL_PATH.stem + ".onnx")

    written: list[Path] = []

    def fake_export(source: Path, out: Path, **_: object) -> object:
        # The real conversion is tested above; copy its result to where the CLI asked.
        written.append(Path(out))
        shutil.copy(exported, out)  # made from the same bytes: its recorded hash matches
        return type("S", (), {"path": Path(out), "size_bytes": 1, "outputs": ["p"],
                              "ood": True, "quantization": None})()  # fmt: skip

    monkeypatch.setattr(pneumoscan.inference.export, "export_onnx", fake_export)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["export", "--model", str(model)])
    assert result.exit_code == 0, result.output
    assert written == [tmp_path / "run" / "model.onnx"]
    assert saved_export(model) == tmp_path / "run" / "model.onnx"  # predict --backend auto
    assert not (tmp_path / "model.onnx").exists()
