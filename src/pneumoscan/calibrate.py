"""Site calibration: refit temperature, bias and threshold on a hospital's own labelled sample.

No learned weight changes: only the numbers that map the network's output to a calibrated
probability (Platt scaling of the logit) and a decision; optionally the batch-norm statistics
(``--unlabelled``). The refit figures on the sample itself are optimistic (the
threshold was chosen on those images), so a patient-grouped cross-validated estimate of the
whole procedure is reported beside them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscan.calibration import (
    apply_temperature,
    fit_temperature_and_bias,
    threshold_for_sensitivity,
)
from pneumoscan.constants import CLASSES, DEFAULT_TARGET_SENSITIVITY
from pneumoscan.data import data_fingerprint, empty_classes, scan_dataset
from pneumoscan.errors import DatasetError
from pneumoscan.metrics import binary_metrics, expected_calibration_error, wilson_interval
from pneumoscan.modelfile import LoadedModel, now_utc, save_model, write_metadata
from pneumoscan.progress import Reporter

#: Widest 95% interval on the sensitivity target tolerated without a warning.
MAX_INTERVAL_WIDTH = 0.10
CV_FOLDS = 5


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


def cross_validated_figures(
    y_true: np.ndarray, p_raw: np.ndarray, patients: np.ndarray, target: float, seed: int = 0
) -> dict[str, Any] | None:
    """Held-out figures of the whole refit: fit on 4/5 of the patients, score the rest."""
    folds = min(CV_FOLDS, int(np.bincount(y_true).min()))
    if folds < 2:
        return None
    p_held_out = np.empty_like(p_raw)
    held_threshold = np.empty_like(p_raw)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit, held in splitter.split(p_raw, y_true, patients):
        temperature, bias = fit_temperature_and_bias(y_true[fit], p_raw[fit])
        p_fit = apply_temperature(p_raw[fit], temperature, bias)
        p_held_out[held] = apply_temperature(p_raw[held], temperature, bias)
        held_threshold[held] = threshold_for_sensitivity(y_true[fit], p_fit, target)
    predicted = p_held_out >= held_threshold
    tp = int(np.sum(predicted & (y_true == 1)))
    tn = int(np.sum(~predicted & (y_true == 0)))
    n_pos, n_neg = int(y_true.sum()), int((1 - y_true).sum())
    return {
        "folds": folds,
        "sensitivity": tp / n_pos,
        "sensitivity_ci": wilson_interval(tp, n_pos),
        "specificity": tn / n_neg,
        "specificity_ci": wilson_interval(tn, n_neg),
        "ece": expected_calibration_error(y_true, p_held_out),
    }


def calibrate_to_site(
    model: str | Path | None,
    data: str | Path,
    out: str | Path,
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY,
    batch_size: int = 32,
    reporter: Reporter | None = None,
    unlabelled: str | Path | None = None,
) -> dict[str, Any]:
    """Refit temperature and threshold on a labelled local sample and save a new model file.

    With ``unlabelled``, the network's batch-norm statistics are first re-estimated on the
    site's own unlabelled X-rays (:func:`pneumoscan.adapt.adapt_batch_norm`); no other weight
    changes.

    Args:
        model: Model file or run folder (default: the shipped model).
        data: Folder with ``NORMAL/`` and ``PNEUMONIA/`` (or a dataset root: all splits used).
        out: Path of the calibrated model file to write (the input is never modified).
        target_sensitivity: Sensitivity the new threshold must reach on the sample.
        batch_size: Images scored at a time.
        reporter: Progress and warnings sink.
        unlabelled: Folder of the site's unlabelled X-rays (searched recursively).

    Returns:
        ``before``, ``after`` (on the sample itself), ``cross_validated`` figures, the new
        ``temperature`` and ``threshold``, and a sample-size ``warning`` (or ``None``).

    Raises:
        DatasetError: A class has no readable image.
    """
    from pneumoscan.modelfile import load_model

    reporter = reporter or Reporter(quiet=True)
    loaded = load_model(model)
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

    before = operating_figures(
        y_true,
        apply_temperature(before_raw, loaded.temperature, loaded.logit_bias),
        loaded.threshold,
    )
    temperature, bias = fit_temperature_and_bias(y_true, p_raw)
    p_after = apply_temperature(p_raw, temperature, bias)
    threshold = threshold_for_sensitivity(y_true, p_after, target_sensitivity)
    after = operating_figures(y_true, p_after, threshold)
    patients = table["patient_id"].to_numpy()
    warning = sample_size_warning(int(y_true.sum()), target_sensitivity)
    result: dict[str, Any] = {
        "model": str(loaded.path),
        "data": str(data),
        "n": len(y_true),
        "n_pneumonia": int(y_true.sum()),
        "target_sensitivity": target_sensitivity,
        "temperature": temperature,
        "logit_bias": bias,
        "threshold": threshold,
        "before": before,
        "after": after,
        "cross_validated": cross_validated_figures(y_true, p_raw, patients, target_sensitivity),
        "warning": warning,
        "batch_norm_adaptation": adapted,
    }
    if warning:
        reporter.warn(warning)
    _save_calibrated(loaded, Path(out), result, data_fingerprint(table))
    return result


def _raw_scores(
    loaded: LoadedModel, paths: list[str], batch_size: int, reporter: Reporter
) -> np.ndarray:
    """Uncalibrated P(pneumonia) per path; NaN where a file cannot be read."""
    from pneumoscan.inference import score_files

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
    from pneumoscan.adapt import adapt_batch_norm
    from pneumoscan.pipeline import iter_decoded_batches
    from pneumoscan.predict import expand_inputs
    from pneumoscan.preprocess import to_model_input

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
    if result["batch_norm_adaptation"]:
        save_model(loaded.network, out, metadata)
    else:
        shutil.copyfile(source, out)
    keys = ("data", "n", "n_pneumonia", "before", "after", "cross_validated")
    site = {k: result[k] for k in keys} | {"batch_norm_adaptation": result["batch_norm_adaptation"]}
    updated = metadata | {
        "temperature": result["temperature"],
        "logit_bias": result["logit_bias"],
        "threshold": result["threshold"],
        "threshold_rule": (
            f"highest threshold with site-sample sensitivity >= {result['target_sensitivity']}"
        ),
        "target_sensitivity": result["target_sensitivity"],
        "site_calibration": site
        | {"fingerprint": fingerprint, "date": now_utc(), "source": str(source)},
    }
    write_metadata(out, updated)
