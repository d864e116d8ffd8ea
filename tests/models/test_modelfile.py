"""Tests for pneumoscan.models.modelfile: metadata travels inside the model file."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pneumoscan.constants import CLASSES, DEFAULT_MODEL_PATH, METADATA_MEMBER
from pneumoscan.data.preprocess import PreprocessConfig
from pneumoscan.errors import ModelFileError
from pneumoscan.models import create_model
from pneumoscan.models.modelfile import (
    MetadataView,
    load_model,
    read_metadata,
    save_model,
    write_metadata,
)


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


def test_the_typed_view_reads_old_metadata_with_defaults() -> None:
    # A model file from before most descriptive keys existed still loads and describes itself.
    old = MetadataView({"threshold": 0.5, "preprocess": PreprocessConfig().to_dict()})
    assert old.arch is None and old.training_data_root is None and old.model_card is None
    assert old.classes == CLASSES and old.stored_temperature is None and old.temperature == 1.0
    assert old.validation_metrics == {} and old.data_info == {} and old.split_record == {}
    assert old.recipe == {} and old.ood is None and old.ood_layers == []
    assert old.saved is None and old.versions == {} and old.training_command is None
    assert old.export_source_sha256 is None and old.preprocess == PreprocessConfig()
    full = MetadataView(
        {
            "arch": "seed",
            "classes": ["NORMAL", "PNEUMONIA"],
            "temperature": 0.9,
            "data": {"root": "/data", "split": {"method": "grouped", "seed": 3}},
            "recipe": {"batchnorm": "frozen"},
            "ood": {"method": "ppca", "layers": ["top"]},
            "export": {"source_sha256": "ab"},
        }
    )
    assert (full.arch, full.classes, full.stored_temperature) == ("seed", CLASSES, 0.9)
    assert full.training_data_root == "/data" and full.split_record["seed"] == 3
    assert full.recipe["batchnorm"] == "frozen" and full.ood_layers == ["top"]
    assert (full.ood or {})["method"] == "ppca" and full.export_source_sha256 == "ab"
