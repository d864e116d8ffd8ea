"""Tests for site calibration (pneumoscan.train.site) on real X-rays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumoscan.cli import app
from pneumoscan.errors import DatasetError
from pneumoscan.models.modelfile import load_model, read_metadata
from pneumoscan.train.site import (
    calibrate_to_site,
    cross_validated_figures,
    sample_size_warning,
    target_warning,
)

from conftest import FIXTURES, SITE_SAMPLE


def _site() -> Path:
    return SITE_SAMPLE if SITE_SAMPLE.is_dir() else FIXTURES


def test_calibration_refits_threshold_and_temperature_only(
    trained_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "site.keras"
    result = calibrate_to_site(
        trained_run, _site(), out, target_sensitivity=0.95, refit_head=False, export=False
    )
    assert result["after"]["sensitivity"] >= 0.95
    metadata = read_metadata(out)
    assert metadata["threshold"] == result["threshold"]
    assert metadata["temperature"] == result["temperature"]
    assert metadata["logit_bias"] == result["logit_bias"]
    assert metadata["site_calibration"]["n"] == result["n"]
    original, calibrated = load_model(trained_run), load_model(out)
    for a, b in zip(original.network.get_weights(), calibrated.network.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert read_metadata(trained_run / "model.keras")["threshold"] == original.threshold
    with pytest.raises(DatasetError, match="new file"):
        calibrate_to_site(out, _site(), out)


def test_cli_prints_before_after_and_warns_on_small_samples(
    trained_run: Path, tmp_path: Path
) -> None:
    # The repo's fixture set is small on purpose (24 pneumonia images): the warning must fire.
    n_pneumonia = len(list((FIXTURES / "PNEUMONIA").glob("*.jpeg")))
    assert sample_size_warning(n_pneumonia, 0.97) is not None
    result = CliRunner().invoke(
        app,
        ["calibrate", "--model", str(trained_run), "--data", str(FIXTURES),
         "--out", str(tmp_path / "m.keras"), "--json", str(tmp_path / "c.json"),
         "--train-data", str(FIXTURES)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "before" in text and "cross-validated" in text and "95% interval" in text
    assert "per subtype: bacteria" in text and "virus" in text and "promise:" in text
    figures = json.loads((tmp_path / "c.json").read_text())
    assert {"before", "after", "cross_validated", "temperature", "threshold"} <= set(figures)
    assert figures["n_pneumonia"] == n_pneumonia
    assert figures["cross_validated"]["repeats"] == 10
    assert set(figures["cross_validated"]["per_subtype"]) == {"bacteria", "virus"}
    chosen = figures["promise"]["chosen"]
    assert chosen["confidence"] == figures["confidence"] and chosen["splits"] == 200
    # predict keeps its TensorFlow-free path: the ONNX export sits beside the calibrated model.
    from pneumoscan.inference.export import onnx_matches

    assert onnx_matches(tmp_path / "m.onnx", tmp_path / "m.keras")


def test_sample_size_warning_thresholds() -> None:
    assert sample_size_warning(62, 0.97) is not None  # the site sample: 89-99%
    assert sample_size_warning(2000, 0.97) is None


def test_a_confidence_margin_keeps_the_promised_sensitivity_on_new_patients() -> None:
    # Scores whose positives overlap the negatives: the plain rule overfits its own sample.
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(80, int), np.ones(120, int)]
    p = 1 / (1 + np.exp(-(rng.normal(0, 1, 200) + 2.5 * y)))
    patients = np.arange(200)
    plain = cross_validated_figures(y, p, patients, 0.95, confidence=0.5)
    margin = cross_validated_figures(y, p, patients, 0.95, confidence=0.8)
    assert plain is not None and margin is not None
    assert margin["sensitivity"] > plain["sensitivity"]
    assert margin["specificity"] <= plain["specificity"]
    assert target_warning(plain, 0.99) is not None and target_warning(margin, 0.5) is None


def test_cross_validation_holds_out_patients() -> None:
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(40, int), np.ones(60, int)]
    p = np.clip(0.3 * y + rng.uniform(0, 0.7, 100), 0.01, 0.99)
    patients = np.arange(100) // 2
    figures = cross_validated_figures(y, p, patients, target=0.9)
    assert figures is not None and figures["folds"] == 5
    assert 0.7 <= figures["sensitivity"] <= 1.0


def test_unlabelled_images_adapt_batch_norm_only(tmp_path: Path) -> None:
    from pneumoscan.models import create_model
    from pneumoscan.models.modelfile import save_model
    from pneumoscan.train.adapt import batch_norm_layers

    source = tmp_path / "bn.keras"
    metadata = {"arch": "efficientnet_lite0_scratch", "classes": ["NORMAL", "PNEUMONIA"],
                "threshold": 0.5, "preprocess": {"image_size": [224, 224]}}  # fmt: skip
    save_model(create_model("efficientnet_lite0_scratch"), source, metadata)
    out = tmp_path / "adapted.keras"
    result = calibrate_to_site(source, FIXTURES, out, unlabelled=FIXTURES / "NORMAL")
    assert result["batch_norm_adaptation"]["images"] == len(list((FIXTURES / "NORMAL").iterdir()))
    before, after = load_model(source).network, load_model(out).network
    norms_before = {layer.name: layer for layer in batch_norm_layers(before)}
    changed = 0
    for layer in batch_norm_layers(after):
        old = norms_before[layer.name]
        np.testing.assert_array_equal(layer.gamma.numpy(), old.gamma.numpy())
        changed += not np.allclose(layer.moving_mean.numpy(), old.moving_mean.numpy())
    assert changed > 0
    conv_before = [w for w in before.weights if "kernel" in w.path]
    conv_after = [w for w in after.weights if "kernel" in w.path]
    for a, b in zip(conv_before, conv_after, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert read_metadata(out)["site_calibration"]["batch_norm_adaptation"]["method"] == "AdaBN"


def test_every_scoring_path_applies_the_stored_calibration(
    trained_run: Path, tmp_path: Path
) -> None:
    from pneumoscan.data.pipeline import decode_all
    from pneumoscan.inference.calibration import apply_temperature
    from pneumoscan.inference.predict import make_scorer, predict_batch
    from pneumoscan.inference.scorer import p_pneumonia
    from pneumoscan.models.modelfile import write_metadata

    path = tmp_path / "shifted.keras"
    path.write_bytes((trained_run / "model.keras").read_bytes())
    write_metadata(path, read_metadata(path) | {"temperature": 2.0, "logit_bias": 1.5})
    model = load_model(path)
    pixels, _, _ = decode_all(
        [str(p) for p in sorted(FIXTURES.glob("*/*.jpeg"))[:6]], model.preprocess
    )
    raw = p_pneumonia(model, pixels, calibrated=False)
    expected = apply_temperature(raw, 2.0, 1.5)
    np.testing.assert_allclose(p_pneumonia(model, pixels), expected, atol=1e-9)
    results = predict_batch(make_scorer(model, None), pixels, ood_check=False)
    np.testing.assert_allclose([r.probability for r in results], expected, atol=1e-6)


def test_adabn_also_adapts_a_network_trained_with_frozen_batch_norm() -> None:
    import keras

    from pneumoscan.train.adapt import adapt_batch_norm
    from pneumoscan.train.loop import freeze_batch_norm

    inputs = keras.Input((4,))
    network = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    freeze_batch_norm(network)
    batch = np.random.default_rng(0).normal(3.0, 1.0, (32, 4)).astype("float32")
    adapt_batch_norm(network, [batch])
    norm = network.layers[1]
    np.testing.assert_allclose(norm.moving_mean.numpy(), batch.mean(axis=0), rtol=1e-5)
    assert norm.trainable is False  # the flag is restored


def test_head_refit_learns_what_the_site_shows_and_keeps_the_original_otherwise() -> None:
    from pneumoscan.train.adapt import refit_head

    rng = np.random.default_rng(0)
    train_y = np.r_[np.zeros(100, int), np.ones(100, int)]
    train_x = rng.normal(0, 1, (200, 6))
    train_x[:, 0] += 2 * train_y  # the training hospital shows pneumonia in feature 0
    site_y = np.r_[np.zeros(40, int), np.ones(40, int)]
    site_x = rng.normal(0, 1, (80, 6))
    site_x[:, 1] += 2 * site_y  # this site shows it in feature 1 instead
    patients = np.arange(80)
    blind = rng.uniform(0, 1, 80)  # an original head that ranks the site at random
    fitted = refit_head(train_x, train_y, site_x, site_y, patients, blind, c=1.0)
    assert fitted["chosen"] != "original" and fitted["candidates"][fitted["chosen"]] > 0.8
    assert fitted["coef"][1] > 0.5 and len(fitted["oof_raw"]) == 80
    perfect = site_y + rng.uniform(0, 0.1, 80)  # an original head already right at the site
    kept = refit_head(train_x, train_y, site_x, site_y, patients, perfect, c=1.0)
    assert kept["chosen"] == "original" and "coef" not in kept
    np.testing.assert_array_equal(kept["oof_raw"], perfect)


def test_calibrate_refits_the_head_on_real_xrays(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "head.keras"
    result = calibrate_to_site(
        trained_run, FIXTURES, out, target_sensitivity=0.9, refit_head=True,
        train_data=FIXTURES, train_images=30, export=False,
    )  # fmt: skip
    head = result["head_refit"]
    assert {"original", "1", "50"} <= set(head["candidates"]) and head["train_images"] == 30
    assert read_metadata(out)["site_calibration"]["head_refit"]["chosen"] == head["chosen"]
    kernel, _ = load_model(out).network.layers[-1].get_weights()
    if head["chosen"] != "original":
        assert np.all(kernel[:, 0] == 0)  # the regression lives in the PNEUMONIA column


def test_calibrate_never_writes_over_an_existing_file(trained_run: Path, tmp_path: Path) -> None:
    from pneumoscan.errors import OutputExistsError

    taken = tmp_path / "theirs.keras"
    taken.write_bytes(b"somebody's file")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        calibrate_to_site(trained_run, FIXTURES, taken, refit_head=False)
    assert taken.read_bytes() == b"somebody's file"
    beside = tmp_path / "new.onnx"
    beside.write_bytes(b"their export")
    with pytest.raises(OutputExistsError, match=r"new\.onnx"):
        calibrate_to_site(trained_run, FIXTURES, tmp_path / "new.keras", refit_head=False)
    assert beside.read_bytes() == b"their export"


def test_a_refitted_head_keeps_the_ood_detector_and_needs_no_training_data(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `calibrate --refit-head` once wrote a model without the out-of-distribution detector:
    # it refused nothing the shipped model refused.
    import pneumoscan.train.adapt as adapt
    from pneumoscan.constants import OOD_MEMBER
    from pneumoscan.data.pipeline import decode_all
    from pneumoscan.data.preprocess import to_model_input
    from pneumoscan.models.head_prior import HeadPrior, read_head_prior, write_head_prior
    from pneumoscan.models.modelfile import read_member, write_member

    source = tmp_path / "shipped.keras"
    source.write_bytes((trained_run / "model.keras").read_bytes())
    write_member(source, OOD_MEMBER, b"the detector's arrays")
    loaded = load_model(source)
    paths = [str(p) for p in sorted(FIXTURES.glob("*/*.jpeg"))]
    pixels, _, _ = decode_all(paths, loaded.preprocess)
    features = adapt.pooled_features(loaded.network, [to_model_input(pixels)])
    labels = np.array(["PNEUMONIA" in p for p in paths], dtype=int)
    write_head_prior(source, HeadPrior(features, labels))
    real_refit = adapt.refit_head

    def blind_original(*args: object, **kwargs: object) -> dict[str, object]:
        # An original head that ranks the site at random, so that a refit is kept.
        site_labels = args[3]
        blind = np.random.default_rng(0).uniform(0, 1, len(site_labels))  # type: ignore[arg-type]
        return real_refit(*args[:5], blind, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(adapt, "refit_head", blind_original)
    out = tmp_path / "site.keras"
    result = calibrate_to_site(source, FIXTURES, out, target_sensitivity=0.9, export=False)
    head = result["head_refit"]
    assert head["chosen"] != "original"
    assert head["train_features"] == "carried in the model file"
    assert head["train_images"] == len(labels)
    assert read_member(out, OOD_MEMBER) == b"the detector's arrays"
    carried = read_head_prior(out)
    assert carried is not None and len(carried.labels) == len(labels)
    kernel, _ = load_model(out).network.layers[-1].get_weights()
    assert np.all(kernel[:, 0] == 0)  # the refitted regression, not the original head


def test_calibrate_promises_what_predict_delivers(trained_run: Path, tmp_path: Path) -> None:
    # calibrate fitted on Keras and printed sensitivity 0.969; predict scored the same images on
    # the ONNX export and delivered 0.961: a threshold equal to a score flipped on 1e-7.
    out = tmp_path / "site.keras"
    result = calibrate_to_site(
        trained_run, FIXTURES, out, target_sensitivity=0.9, train_data=FIXTURES,
        train_images=30,
    )  # fmt: skip
    assert result["after"]["backend"] == "OnnxModel"
    csv = tmp_path / "rows.csv"
    printed = CliRunner().invoke(
        app, ["predict", str(FIXTURES), "--model", str(out), "--out", str(csv)]
    )
    assert printed.exit_code == 0, printed.output
    import pandas as pd

    rows = pd.read_csv(csv)
    flagged = rows["probability"].to_numpy() >= read_metadata(out)["threshold"]
    truth = rows["path"].str.contains("PNEUMONIA").to_numpy()
    delivered = [
        [int(np.sum(~truth & ~flagged)), int(np.sum(~truth & flagged))],
        [int(np.sum(truth & ~flagged)), int(np.sum(truth & flagged))],
    ]
    assert delivered == result["after"]["confusion_matrix"]


def test_evaluating_on_the_calibration_sample_is_flagged(tmp_path: Path) -> None:
    from pneumoscan.data.dataset import file_sha1
    from pneumoscan.train.site import calibration_sample_overlap

    sample = sorted(FIXTURES.glob("*/*.jpeg"))
    expected = {"sensitivity": 0.97, "sensitivity_ci": [0.93, 0.99],
                "specificity": 0.9, "specificity_ci": [0.81, 0.95]}  # fmt: skip
    metadata = {"site_calibration": {"files": [file_sha1(p)[:16] for p in sample[:10]],
                                     "cross_validated": expected}}  # fmt: skip
    found = calibration_sample_overlap(metadata, sample)
    assert found is not None and found["overlap"] == 10 and found["n"] == len(sample)
    assert "in-sample" in found["warning"] and "0.970 (0.930-0.990)" in found["warning"]
    assert calibration_sample_overlap(metadata, sample[10:]) is None
    assert calibration_sample_overlap({"threshold": 0.5}, sample) is None


def test_calibrate_refits_the_subtype_estimate_under_the_promise_rules(
    subtype_model: Path, trained_run: Path, tmp_path: Path
) -> None:
    from pneumoscan.data.dataset import scan_dataset

    site = _site()
    out = tmp_path / "site.keras"
    result = calibrate_to_site(
        subtype_model, site, out, refit_head=False, export=False, subtype=True, confidence=0.8
    )
    found = result["subtype"]
    table = scan_dataset(site, read_headers=False)
    assert found["n_bacterial"] == int((table["subtype"] == "bacteria").sum())
    assert found["n_viral"] == int((table["subtype"] == "virus").sum())
    # At a one-sided 80% bound of 0.9, the sample's own bacterial sensitivity is above 0.9.
    assert found["after"]["sensitivity"] >= 0.9
    assert found["cross_validated"]["folds"] >= 2
    entry = read_metadata(out)["subtype"]
    point = entry["operating_point"]
    assert point["threshold_fitted_on"] == "site sample"
    assert point["threshold_confidence"] == 0.8
    assert point["threshold"] == found["threshold"]
    assert entry["head"] == read_metadata(subtype_model)["subtype"]["head"]  # weights kept
    assert read_metadata(out)["site_calibration"]["subtype"]["n_viral"] == found["n_viral"]
    with pytest.raises(DatasetError, match="no subtype head"):
        calibrate_to_site(trained_run, site, tmp_path / "x.keras", export=False, subtype=True)
