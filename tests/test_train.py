"""Tests for pneumoscan.train: a real short run, its artefacts, and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pneumoscan.errors import DatasetError, PneumoscanError
from pneumoscan.modelfile import read_metadata
from pneumoscan.train import TrainOptions, options_to_command, train

from conftest import FIXTURES


def test_run_folder_holds_everything_to_reproduce(trained_run: Path) -> None:
    config = json.loads((trained_run / "config.json").read_text())
    assert config["options"]["seed"] == 42 and config["recipe"]["optimizer"] == "rmsprop"
    assert config["preprocess"]["image_size"] == [224, 224]
    assert len(config["data_fingerprint"]) == 64
    split = pd.read_csv(trained_run / "split.csv")
    assert set(split["split"]) == {"train", "val"}
    assert split.groupby("patient_id")["split"].nunique().max() == 1
    history = pd.read_csv(trained_run / "history.csv")
    assert history["epoch"].tolist() == [1]
    assert 0.0 <= history["val_auc"].iloc[0] <= 1.0
    assert (trained_run / "training_curves.png").stat().st_size > 10_000
    metadata = read_metadata(trained_run / "model.keras")
    assert metadata["classes"] == ["NORMAL", "PNEUMONIA"]
    assert 0.0 < metadata["threshold"] < 1.0 and metadata["temperature"] > 0
    assert metadata["validation_metrics"]["sensitivity"] >= metadata["target_sensitivity"]
    assert metadata["data"]["fingerprint"] == config["data_fingerprint"]
    assert {"keras", "numpy", "python"} <= set(metadata["versions"])
    assert metadata["validation_metrics"]["n"] == (split["split"] == "val").sum()
    assert metadata["command"].startswith("pneumoscan train --data ")


def test_existing_run_is_not_overwritten(trained_run: Path) -> None:
    options = json.loads((trained_run / "config.json").read_text())["options"]
    with pytest.raises(PneumoscanError, match="--resume"):
        train(TrainOptions(**options))


def test_resume_continues_from_the_last_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    options = json.loads((run / "config.json").read_text())["options"]
    options |= {"out": str(run), "resume": True, "epochs": 2}
    result = train(TrainOptions(**options))
    assert result.epochs_run == 1
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1, 2]
    assert json.loads((run / "checkpoints" / "state.json").read_text())["epochs_completed"] == 2
    options["seed"] = 7
    with pytest.raises(PneumoscanError, match="seed"):
        train(TrainOptions(**options))


def test_unreadable_images_are_skipped_and_recorded(tmp_path: Path) -> None:
    data = tmp_path / "xrays"
    shutil.copytree(FIXTURES, data)
    (data / "NORMAL" / "zero.jpeg").write_bytes(b"")
    good = next((data / "PNEUMONIA").glob("*.jpeg")).read_bytes()
    (data / "PNEUMONIA" / "person9999_bacteria_1.jpeg").write_bytes(good[: len(good) // 2])
    out = tmp_path / "run"
    result = train(TrainOptions(data=str(data), out=str(out), epochs=1, val_fraction=0.25))
    skipped = pd.read_csv(out / "skipped.csv")
    assert "person9999_bacteria_1.jpeg" in " ".join(skipped["path"])
    assert result.model_path.exists()


def test_a_class_without_images_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "xrays"
    shutil.copytree(FIXTURES / "NORMAL", data / "NORMAL")
    (data / "PNEUMONIA").mkdir()
    with pytest.raises(DatasetError, match="PNEUMONIA"):
        train(TrainOptions(data=str(data), out=str(tmp_path / "run"), epochs=1))


def test_command_reproduces_options() -> None:
    command = options_to_command(TrainOptions(data="d", out="o", epochs=3, resume=True))
    assert command == (
        "pneumoscan train --data d --out o --arch seed --epochs 3 --seed 42 --val-fraction 0.1"
        " --target-sensitivity 0.97"
    )


def test_mixed_precision_trains_but_ships_float32(trained_run: Path) -> None:
    import keras

    config = json.loads((trained_run / "config.json").read_text())
    assert config["recipe"]["precision"] == "mixed_bfloat16"  # the seed recipe's
    checkpoint = keras.saving.load_model(trained_run / "checkpoints" / "last.keras")
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in checkpoint.layers}
    shipped = keras.saving.load_model(trained_run / "model.keras")
    assert {layer.dtype_policy.name for layer in shipped.layers} == {"float32"}
    assert keras.config.dtype_policy().name == "float32"  # restored after training


def test_dtype_policy_is_restored_and_checked() -> None:
    import keras

    from pneumoscan.train import dtype_policy

    with pytest.raises(RuntimeError), dtype_policy("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        raise RuntimeError("interrupted")
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match="unknown precision"), dtype_policy("float8"):
        pass
