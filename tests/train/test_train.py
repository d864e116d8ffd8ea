"""Tests for pneumoscan.train.loop: a real short run, its artefacts, and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pneumoscan.errors import DatasetError, OutputExistsError, PneumoscanError
from pneumoscan.models.modelfile import load_model, read_metadata
from pneumoscan.progress import Reporter
from pneumoscan.train.loop import TrainOptions, options_to_command, small_validation_warning, train

from conftest import FIXTURES, SHARED_TRAIN


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
    reporter = Reporter(quiet=True)
    options = TrainOptions(data=str(data), out=str(out), epochs=1, val_fraction=0.25)
    result = train(options, reporter)
    skipped = pd.read_csv(out / "skipped.csv")
    # 48 fixture images give a validation split far too small to choose a threshold on.
    (small,) = [w for w in reporter.warnings if "validation split has" in w]
    counts = json.loads((out / "config.json").read_text())["split"]["counts"]
    assert f"{counts['val/PNEUMONIA']} pneumonia and {counts['val/NORMAL']} normal" in small
    assert "person9999_bacteria_1.jpeg" in " ".join(skipped["path"])
    assert result.model_path.exists()


def test_a_class_without_images_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "xrays"
    shutil.copytree(FIXTURES / "NORMAL", data / "NORMAL")
    (data / "PNEUMONIA").mkdir()
    with pytest.raises(DatasetError, match="PNEUMONIA"):
        train(TrainOptions(data=str(data), out=str(tmp_path / "run"), epochs=1))


def test_small_validation_split_warns_with_counts_and_a_remedy() -> None:
    assert small_validation_warning(50, 20) is None
    assert small_validation_warning(400, 130) is None
    for pneumonia, normal in ((49, 200), (300, 19), (5, 3)):
        message = small_validation_warning(pneumonia, normal)
        assert message is not None
        assert f"{pneumonia} pneumonia and {normal} normal" in message
        assert "--val-fraction" in message and "pneumoscan calibrate" in message


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

    from pneumoscan.train.loop import dtype_policy

    with pytest.raises(RuntimeError), dtype_policy("mixed_bfloat16"):
        assert keras.config.dtype_policy().name == "mixed_bfloat16"
        raise RuntimeError("interrupted")
    assert keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match="unknown precision"), dtype_policy("float8"):
        pass


def test_frozen_batch_norm_keeps_its_statistics_while_training() -> None:
    import keras
    import numpy as np

    from pneumoscan.train.loop import freeze_batch_norm

    inputs = keras.Input((8,))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.BatchNormalization()(inputs))
    network = keras.Model(inputs, outputs)
    before = [w.copy() for w in network.layers[1].get_weights()]  # gamma, beta, mean, var
    assert freeze_batch_norm(network) == 1
    network.compile(optimizer="adam", loss="categorical_crossentropy")
    x = np.random.default_rng(0).normal(5.0, 3.0, (64, 8)).astype("float32")
    network.fit(x, np.eye(2)[np.arange(64) % 2], epochs=2, verbose=0)
    for a, b in zip(before, network.layers[1].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_recipe_choices_are_validated(tmp_path: Path) -> None:
    from pneumoscan.train.loop import resolve_recipe

    options = TrainOptions(data="d", out="o", arch="efficientnet_lite0")
    assert resolve_recipe(options).batchnorm == "frozen"  # the registered default
    for field, value in (("batchnorm", "sometimes"), ("select_on", "val_accuracy")):
        with pytest.raises(PneumoscanError, match=field):
            resolve_recipe(TrainOptions(data="d", out="o", **{field: value}))


def test_soft_targets_mix_labels_with_the_teacher(trained_run: Path) -> None:
    import numpy as np

    from pneumoscan.data.pipeline import decode_all, training_batches
    from pneumoscan.data.preprocess import PreprocessConfig
    from pneumoscan.models.modelfile import load_model
    from pneumoscan.progress import Reporter
    from pneumoscan.train.callbacks import predict_pixels
    from pneumoscan.train.loop import _distillation_targets

    paths = [str(p) for p in sorted(FIXTURES.glob("*/*.jpeg"))[:6]]
    pixels, _, _ = decode_all(paths, PreprocessConfig())
    labels = np.array([0, 0, 0, 1, 1, 1])
    teacher = str(trained_run / "model.keras")
    options = TrainOptions(data="d", out="o", teacher=teacher, distill_weight=0.25)
    targets = _distillation_targets(options, pixels, labels, Reporter(quiet=True))
    assert targets is not None and targets.shape == (6, 2)
    p_teacher = predict_pixels(load_model(teacher).network, pixels)
    np.testing.assert_allclose(targets[:, 1], 0.75 * labels + 0.25 * p_teacher, atol=1e-6)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-6)
    _, y = next(training_batches(pixels, labels, 6, 0, 0, 1, targets=targets))
    assert not np.array_equal(y, np.eye(2)[labels[np.sort(np.arange(6))]])
    with pytest.raises(PneumoscanError, match="distill-weight"):
        _distillation_targets(
            TrainOptions(data="d", out="o", teacher=teacher, distill_weight=1.5),
            pixels, labels, Reporter(quiet=True),
        )  # fmt: skip


def test_a_folder_of_someone_elses_files_is_not_overwritten(tmp_path: Path) -> None:
    # Issue 22: train --out on an ordinary folder overwrote the user's config.json, then
    # crashed on their history.csv.
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"theme": "dark"}')
    (out / "history.csv").write_text("date,weight\n")
    (out / "notes.txt").write_text("keep")
    with pytest.raises(OutputExistsError, match=r"not a pneumoscan run.*config.json, history.csv"):
        train(TrainOptions(data=str(FIXTURES), out=str(out), epochs=1))
    assert (out / "config.json").read_text() == '{"theme": "dark"}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "history.csv", "notes.txt"]


def test_a_finished_run_without_checkpoints_is_not_replaced(tmp_path: Path) -> None:
    # Issue 22: a finished run whose checkpoints/ was removed had its model.keras replaced.
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.keras").write_bytes(b"the user's model")
    with pytest.raises(OutputExistsError, match="holds a finished model"):
        train(TrainOptions(data=str(FIXTURES), out=str(out), epochs=1))
    assert (out / "model.keras").read_bytes() == b"the user's model"


def test_frozen_blocks_keep_their_pretrained_weights() -> None:
    from pneumoscan.errors import InvalidInputError
    from pneumoscan.models import create_model
    from pneumoscan.train.loop import freeze_early_blocks

    network = create_model("efficientnet_lite0")
    frozen = freeze_early_blocks(network, 5)
    assert "stem_conv" in frozen and "block4_project_conv" in frozen
    assert not any(name.startswith("block5_") for name in frozen)
    trainable = {w.path.split("/")[0] for w in network.trainable_weights}
    assert "block5_project_conv" in trainable and not trainable & set(frozen)
    with pytest.raises(InvalidInputError, match="block99"):
        freeze_early_blocks(create_model("efficientnet_lite0"), 100)


def test_a_subtype_head_trains_beside_the_pneumonia_head_and_ships_as_numbers(
    tmp_path: Path,
) -> None:
    import pandas as pd

    from pneumoscan.api import load

    out = tmp_path / "run"
    data = SHARED_TRAIN.parent if SHARED_TRAIN.is_dir() else FIXTURES
    result = train(
        TrainOptions(
            data=str(data), out=str(out), arch="efficientnet_lite0", epochs=1,
            max_images=160 if SHARED_TRAIN.is_dir() else None, val_fraction=0.3, subtype_weight=1.0,
        )
    )  # fmt: skip
    metadata = read_metadata(result.model_path)
    entry = metadata["subtype"]
    assert len(entry["head"]["weights"]) == 1280
    assert entry["operating_point"]["threshold_fitted_on"] == "validation split"
    assert entry["validation_metrics"]["sensitivity"] >= 0.9  # the bacterial target
    assert "val_subtype_auc" in pd.read_csv(out / "history.csv").columns
    # The shipped network has one output: the decision is the pneumonia head's alone.
    assert len(load_model(result.model_path).network.outputs) == 1
    rows = load(result.model_path).predict(sorted(FIXTURES.glob("*/*.jpeg")))
    pneumonia = rows["decision"] == "PNEUMONIA"
    assert rows.loc[pneumonia, "subtype_estimate"].isin(["bacterial", "viral"]).all()
    assert rows.loc[~pneumonia, "p_viral"].isna().all()


def test_without_named_causes_the_subtype_head_is_left_out_with_a_warning(
    class_folder: Path, tmp_path: Path
) -> None:
    for path in (class_folder / "PNEUMONIA").glob("*"):
        path.rename(path.with_name(path.name.replace("bacteria", "x").replace("virus", "x")))
    reporter = Reporter(quiet=True)
    result = train(
        TrainOptions(
            data=str(class_folder), out=str(tmp_path / "run"), arch="efficientnet_lite0",
            epochs=1, val_fraction=0.3,
        ),
        reporter,
    )  # fmt: skip
    assert "subtype" not in read_metadata(result.model_path)
    assert any("no subtype head" in message for message in reporter.warnings)
