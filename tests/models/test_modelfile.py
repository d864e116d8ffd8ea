"""Tests for pneumoscan.models.modelfile: metadata travels inside the model file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.constants import DEFAULT_MODEL_PATH, METADATA_MEMBER
from pneumoscan.errors import ModelFileError
from pneumoscan.models import create_model
from pneumoscan.models.modelfile import load_model, read_metadata, save_model, write_metadata


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    network = create_model("seed")
    metadata = {"arch": "seed", "classes": ["NORMAL", "PNEUMONIA"], "threshold": 0.3,
                "preprocess": {"image_size": [224, 224]}}  # fmt: skip
    path = save_model(network, tmp_path / "m.keras", metadata)
    loaded = load_model(path)
    assert loaded.threshold == 0.3 and loaded.preprocess.image_size == (224, 224)
    batch = np.random.default_rng(1).random((2, 224, 224, 3)).astype(np.float32)
    np.testing.assert_allclose(
        loaded.network.predict_on_batch(batch), network.predict_on_batch(batch), atol=1e-6
    )
    write_metadata(path, read_metadata(path) | {"threshold": 0.7})
    assert load_model(path).threshold == 0.7


def test_files_without_metadata_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.keras"
    create_model("seed").save(plain)
    with pytest.raises(ModelFileError, match=METADATA_MEMBER):
        load_model(plain)
    junk = tmp_path / "junk.keras"
    junk.write_text("not a zip")
    with pytest.raises(ModelFileError, match="not a Keras model archive"):
        read_metadata(junk)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "missing.keras")


def test_reading_metadata_does_not_import_tensorflow() -> None:
    code = (
        "import sys; from pneumoscan.models.modelfile import read_metadata; "
        f"read_metadata({str(DEFAULT_MODEL_PATH)!r}); print('tensorflow' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_shipped_model_carries_its_metadata() -> None:
    metadata = read_metadata(DEFAULT_MODEL_PATH)
    assert metadata["classes"] == ["NORMAL", "PNEUMONIA"]
    assert metadata["preprocess"]["image_size"] == [224, 224]
    assert len(metadata["data"]["fingerprint"]) == 64
    assert 0.0 < metadata["threshold"] < 1.0
    assert "auc" in metadata["validation_metrics"]
    assert DEFAULT_MODEL_PATH.stat().st_size < 25 * 2**20
    with zipfile.ZipFile(DEFAULT_MODEL_PATH) as archive:
        assert "model.weights.h5" in archive.namelist()
