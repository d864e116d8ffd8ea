"""Site calibration: refit temperature, bias and threshold on a hospital's own labelled sample.

No learned weight changes: only the numbers that map the network's output to a calibrated
probability (Platt scaling of the logit) and a decision; optionally the batch-norm statistics
(``--unlabelled``). The refit figures on the sample itself are optimistic (the
threshold was chosen on those images), so a patient-grouped cross-validated estimate of the
whole procedure is reported beside them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscan.constants import (
    CLASSES,
    DEFAULT_CONFIDENCE,
    DEFAULT_HEAD_TRAIN_IMAGES,
    DEFAULT_SITE_TARGET_SENSITIVITY,
)
from pneumoscan.data.cache import cached_decode
from pneumoscan.data.dataset import data_fingerprint, empty_classes, scan_dataset, select_split
from pneumoscan.data.pipeline import decode_all, iter_decoded_batches
from pneumoscan.data.preprocess import to_model_input
from pneumoscan.errors import DatasetError
from pneumoscan.inference.calibration import (
    apply_temperature,
    fit_scaling_and_threshold,
)
from pneumoscan.metrics import binary_metrics, expected_calibration_error, wilson_interval
from pneumoscan.models.modelfile import (
    LoadedModel,
    OperatingPoint,
    load_model,
    now_utc,
    save_model,
    write_metadata,
)
from pneumoscan.progress import Reporter

#: Widest 95% interval on the sensitivity target tolerated without a warning.
MAX_INTERVAL_WIDTH = 0.10
CV_FOLDS = 5
#: Repeats of the patient-grouped cross-validation (each with its own fold assignment).
CV_REPEATS = 10


def operating_figures(
    y_true: np.ndarray, p_pneumonia: np.ndarray, threshold: float
) -> dict[str, Any]:
    """Sensitivity and specificity with Wilson 95% intervals, ECE, at one threshold."""
    metrics = binary_metrics(y_true, p_pneumonia, threshold)
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    return {
        "threshold": float(threshold),
        "sensitivity": metrics["sensitivity"],
        "sensitivity_ci": wilson_interval(tp, tp + fn),
        "specificity": metrics["specificity"],
        "specificity_ci": wilson_interval(tn, tn + fp),
        "auc": metrics["auc"],
        "ece": expected_calibration_error(y_true, p_pneumonia),
        "confusion_matrix": metrics["confusion_matrix"],
    }


def sample_size_warning(n_positive: int, target: float) -> str | None:
    """A warning when too few pneumonia images pin the sensitivity down, else ``None``."""
    hits = round(target * n_positive)
    low, high = wilson_interval(hits, n_positive)
    if high - low <= MAX_INTERVAL_WIDTH:
        return None
    return (
        f"with {n_positive} pneumonia images, an observed sensitivity of {hits / n_positive:.0%} "
        f"has a 95% interval of {low:.0%}-{high:.0%}; the chosen threshold is correspondingly "
        "uncertain. Add labelled pneumonia images for a firmer operating point."
    )


def held_out_repeats(
    y_true: np.ndarray,
    p_raw: np.ndarray,
    patients: np.ndarray,
    target: float,
    confidence: float,
    folds: int,
    repeats: int,
    seed: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(held-out calibrated P(pneumonia), flagged)`` of the whole site refit, per repeat.

    Each repeat fits Platt scaling and the threshold on the patients of ``folds - 1`` folds
    and applies them to the held-out fold, so every image is scored once per repeat by a
    refit that never saw its patient.
    """
    for repeat in range(repeats):
        p_held_out = np.empty_like(p_raw)
        flagged = np.zeros(len(p_raw), dtype=bool)
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed + repeat)
        for fit, held in splitter.split(p_raw, y_true, patients):
            temperature, bias, threshold = fit_scaling_and_threshold(
                y_true[fit], p_raw[fit], target, confidence
            )
            p_held_out[held] = apply_temperature(p_raw[held], temperature, bias)
            flagged[held] = p_held_out[held] >= threshold
        yield p_held_out, flagged


def cross_validated_figures(
    y_true: np.ndarray,
    p_raw: np.ndarray,
    patients: np.ndarray,
    target: float,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    repeats: int = CV_REPEATS,
) -> dict[str, Any] | None:
    """Held-out figures of the whole refit, by repeated patient-grouped cross-validation.

    Each repeat fits on 4/5 of the patients and scores the rest, so every image is scored
    once per repeat by a refit that never saw its patient. Rates are averaged over repeats;
    their intervals are Wilson intervals at the sample's size (the repeats reuse the same
    images, so they narrow nothing), and ``sensitivity_range`` shows the spread of repeats.

    Returns:
        ``None`` when a class has fewer than two images (no fold can hold both).
    """
    folds = min(CV_FOLDS, int(np.bincount(y_true, minlength=2).min()))
    if folds < 2:
        return None
    n_pos, n_neg = int(y_true.sum()), int((1 - y_true).sum())
    sens, spec, eces = [], [], []
    for p_held_out, predicted in held_out_repeats(
        y_true, p_raw, patients, target, confidence, folds, repeats, seed
    ):
        sens.append(np.sum(predicted & (y_true == 1)) / n_pos)
        spec.append(np.sum(~predicted & (y_true == 0)) / n_neg)
        eces.append(expected_calibration_error(y_true, p_held_out))
    sensitivity, specificity = float(np.mean(sens)), float(np.mean(spec))
    return {
        "folds": folds,
        "repeats": repeats,
        "confidence": confidence,
        "sensitivity": sensitivity,
        "sensitivity_ci": wilson_interval(round(sensitivity * n_pos), n_pos),
        "sensitivity_range": (float(np.min(sens)), float(np.max(sens))),
        "specificity": specificity,
        "specificity_ci": wilson_interval(round(specificity * n_neg), n_neg),
        "specificity_range": (float(np.min(spec)), float(np.max(spec))),
        "ece": float(np.mean(eces)),
    }


def target_warning(cross_validated: dict[str, Any] | None, target: float) -> str | None:
    """A warning when the cross-validated sensitivity falls short of the target."""
    if cross_validated is None or cross_validated["sensitivity"] >= target:
        return None
    return (
        f"on held-out patients of this sample (cross-validated), the refit reached a "
        f"sensitivity of {cross_validated['sensitivity']:.1%}, short of the {target:.0%} "
        "target: expect fewer pneumonia cases caught than asked. Label more pneumonia images "
        "or raise --confidence."
    )


def calibrate_to_site(
    model: str | Path | None,
    data: str | Path,
    out: str | Path,
    target_sensitivity: float = DEFAULT_SITE_TARGET_SENSITIVITY,
    batch_size: int = 32,
    reporter: Reporter | None = None,
    unlabelled: str | Path | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    export: bool = True,
    refit_head: bool = False,
    train_data: str | Path | None = None,
    train_images: int = DEFAULT_HEAD_TRAIN_IMAGES,
) -> dict[str, Any]:
    """Refit temperature and threshold on a labelled local sample and save a new model file.

    With ``unlabelled``, the network's batch-norm statistics are first re-estimated on the
    site's own unlabelled X-rays (:func:`pneumoscan.train.adapt.adapt_batch_norm`); no other weight
    changes.

    Args:
        model: Model file or run folder (default: the shipped model).
        data: Folder with ``NORMAL/`` and ``PNEUMONIA/`` (or a dataset root: all splits used).
        out: Path of the calibrated model file to write (the input is never modified).
        target_sensitivity: Sensitivity the new threshold must reach on the sample.
        batch_size: Images scored at a time.
        reporter: Progress and warnings sink.
        unlabelled: Folder of the site's unlabelled X-rays (searched recursively).
        confidence: One-sided confidence with which the sensitivity on the sample must reach
            the target (0.5: the plain rule, no margin; see
            :func:`pneumoscan.inference.calibration.threshold_with_confidence`).
        export: Also write the float32 ONNX export beside ``out`` (``OUT.onnx``), so that
            ``predict`` keeps its TensorFlow-free path for the calibrated model.
        refit_head: Also refit the final layer on training plus site features
            (:func:`pneumoscan.train.adapt.refit_head`; the site's weight, or keeping the original
            layer, chosen by patient-grouped cross-validation). The threshold is then fitted
            on the chosen head's out-of-fold scores, as new site images will see it.
        train_data: The model's training data for ``refit_head`` (default: the root recorded
            in the model).
        train_images: How many training images (a seeded sample) the head refit uses.

    Returns:
        ``before``, ``after`` (on the sample itself), ``cross_validated`` figures (the
        expected figures on new images of the site), the new ``temperature`` and
        ``threshold``, a sample-size ``warning`` and a ``target_warning`` (or ``None``).

    Raises:
        DatasetError: A class has no readable image.
    """

    reporter = reporter or Reporter(quiet=True)
    loaded = load_model(model)
    if unlabelled and loaded.recipe.get("batchnorm") == "frozen":
        # Measured (MODEL_CARD.md): cross-fitted AdaBN took the site AUC of a frozen-BN
        # Lite0 from 0.982 to 0.932; its layers only ever saw the ImageNet statistics.
        raise DatasetError(
            f"{loaded.path} was trained with frozen batch normalisation (ImageNet statistics); "
            "re-estimating them on site images (--unlabelled) makes it worse. "
            "Calibrate without --unlabelled."
        )
    table = scan_dataset(data)
    paths = table["path"].tolist()
    before_raw = _raw_scores(loaded, paths, batch_size, reporter)
    adapted = _adapt(loaded, Path(unlabelled), batch_size, reporter) if unlabelled else None
    p_raw = _raw_scores(loaded, paths, batch_size, reporter) if adapted else before_raw
    scored = ~np.isnan(p_raw)
    table = table[scored].assign(error="")
    if empty_classes(table):
        raise DatasetError(f"{data}: calibration needs readable NORMAL and PNEUMONIA images")
    y_true = (table["label"] == CLASSES[1]).to_numpy().astype(int)
    p_raw, before_raw = p_raw[scored], before_raw[scored]
    head: dict[str, Any] | None = None
    if refit_head:
        head = _refit_head(loaded, table, y_true, p_raw, train_data, train_images, reporter)
        p_raw = head.pop("oof_raw")

    before = operating_figures(
        y_true,
        apply_temperature(before_raw, loaded.temperature, loaded.logit_bias),
        loaded.threshold,
    )
    temperature, bias, threshold = fit_scaling_and_threshold(
        y_true, p_raw, target_sensitivity, confidence
    )
    p_after = apply_temperature(p_raw, temperature, bias)
    after = operating_figures(y_true, p_after, threshold)
    patients = table["patient_id"].to_numpy()
    warning = sample_size_warning(int(y_true.sum()), target_sensitivity)
    cross_validated = cross_validated_figures(
        y_true, p_raw, patients, target_sensitivity, confidence=confidence
    )
    short = target_warning(cross_validated, target_sensitivity)
    result: dict[str, Any] = {
        "model": str(loaded.path),
        "data": str(data),
        "n": len(y_true),
        "n_pneumonia": int(y_true.sum()),
        "target_sensitivity": target_sensitivity,
        "confidence": confidence,
        "temperature": temperature,
        "logit_bias": bias,
        "threshold": threshold,
        "before": before,
        "after": after,
        "cross_validated": cross_validated,
        "warning": warning,
        "target_warning": short,
        "batch_norm_adaptation": adapted,
        "head_refit": head,
    }
    for message in (warning, short):
        if message:
            reporter.warn(message)
    _save_calibrated(loaded, Path(out), result, data_fingerprint(table))
    if export:
        from pneumoscan.inference.export import export_onnx  # lazy: loads SciPy

        with reporter.task("writing the ONNX export beside it", total=1) as advance:
            result["onnx"] = str(export_onnx(out, Path(out).with_suffix(".onnx")).path)
            advance(1)
    return result


def _refit_head(
    loaded: LoadedModel,
    table: Any,
    y_true: np.ndarray,
    p_raw: np.ndarray,
    train_data: str | Path | None,
    train_images: int,
    reporter: Reporter,
) -> dict[str, Any]:
    """Refit the network's final layer in place (when cross-validation says it helps)."""
    # lazy: loads TensorFlow
    from pneumoscan.train.adapt import pooled_features, refit_head, set_binary_head

    root = train_data or loaded.training_data_root
    if not root or not Path(root).exists():
        raise DatasetError(
            f"the head refit needs the model's training data; recorded root {root!r} is not "
            "here: pass --train-data"
        )
    train = select_split(scan_dataset(root), "train", loaded.metadata)
    train = train[train["error"] == ""]
    train = train.sample(n=min(train_images, len(train)), random_state=0).reset_index(drop=True)

    def features(pixels: np.ndarray) -> np.ndarray:
        batches = (to_model_input(pixels[i : i + 64]) for i in range(0, len(pixels), 64))
        return pooled_features(loaded.network, batches)

    with reporter.task("head refit: training features", total=len(train)) as advance:
        train_pixels, kept, _ = cached_decode(train["path"].tolist(), loaded.preprocess, None)
        advance(len(train) // 2)
        train_x = features(train_pixels)
        advance(len(train) - len(train) // 2)
    train_y = (train["label"].to_numpy()[kept] == CLASSES[1]).astype(int)
    site_pixels, site_kept, _ = decode_all(table["path"].tolist(), loaded.preprocess)
    if len(site_kept) != len(table):
        raise DatasetError("a site image became unreadable during calibration; run it again")
    site_x = features(site_pixels)
    fitted = refit_head(train_x, train_y, site_x, y_true, table["patient_id"].to_numpy(), p_raw)
    coef, intercept = fitted.pop("coef", None), fitted.pop("intercept", None)
    if coef is not None and intercept is not None:
        set_binary_head(loaded.network, coef, intercept)
    reporter.info(
        "head refit: out-of-fold site AUC "
        + ", ".join(f"{k} {v:.4f}" for k, v in fitted["candidates"].items())
        + f"; kept {fitted['chosen']}"
    )
    return fitted | {"train_images": len(train_y), "train_data": str(root)}


def _raw_scores(
    loaded: LoadedModel, paths: list[str], batch_size: int, reporter: Reporter
) -> np.ndarray:
    """Uncalibrated P(pneumonia) per path; NaN where a file cannot be read."""
    from pneumoscan.inference.scorer import score_files  # lazy: loads SciPy

    p_raw = np.full(len(paths), np.nan)
    with reporter.task("scoring the labelled sample", total=len(paths)) as advance:
        for score in score_files(loaded, paths, batch_size=batch_size, calibrated=False):
            if score.probability is None:
                reporter.warn(f"skipped {score.error}")
            else:
                p_raw[score.position] = score.probability
            advance(1)
    return p_raw


def _adapt(
    loaded: LoadedModel, folder: Path, batch_size: int, reporter: Reporter
) -> dict[str, Any]:
    """Re-estimate batch-norm statistics on every readable image under ``folder``."""
    from pneumoscan.inference.predict import expand_inputs  # lazy: loads SciPy
    from pneumoscan.train.adapt import adapt_batch_norm  # lazy: loads TensorFlow

    files, problems = expand_inputs([folder])
    if problems:
        raise DatasetError(problems[0]["error"])
    batches = iter_decoded_batches(files, loaded.preprocess, batch_size=batch_size)
    try:
        used = adapt_batch_norm(
            loaded.network, (to_model_input(b.pixels) for b in batches if len(b.pixels))
        )
    except ValueError as exc:
        raise DatasetError(f"{folder}: {exc}") from exc
    reporter.info(f"batch-norm statistics re-estimated on {used} unlabelled images of {folder}")
    return {"method": "AdaBN", "images": used, "folder": str(folder)}


def _save_calibrated(
    loaded: LoadedModel, out: Path, result: dict[str, Any], fingerprint: str
) -> None:
    source, metadata = loaded.path, loaded.metadata
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.resolve() == source.resolve():
        raise DatasetError(f"{out}: choose a new file; the input model is kept unchanged")
    head = result.get("head_refit")
    if result["batch_norm_adaptation"] or (head and head["chosen"] != "original"):
        save_model(loaded.network, out, metadata)
    else:
        shutil.copyfile(source, out)
    keys = ("data", "n", "n_pneumonia", "confidence", "before", "after", "cross_validated")
    site = {k: result[k] for k in keys} | {
        "batch_norm_adaptation": result["batch_norm_adaptation"],
        "head_refit": result.get("head_refit"),
    }
    point = OperatingPoint(
        threshold=result["threshold"],
        temperature=result["temperature"],
        logit_bias=result["logit_bias"],
        threshold_rule=(
            f"highest threshold whose site-sample sensitivity has a one-sided "
            f"{result['confidence']:.0%} lower bound >= {result['target_sensitivity']}"
        ),
        target_sensitivity=result["target_sensitivity"],
    )
    updated = (
        metadata
        | point.to_metadata()
        | {
            "site_calibration": site
            | {"fingerprint": fingerprint, "date": now_utc(), "source": str(source)},
        }
    )
    write_metadata(out, updated)
