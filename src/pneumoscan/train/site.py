"""Site calibration: adapt a model to a hospital's own labelled sample (``pneumoscan calibrate``).

The final layer is refitted on the site's features beside training features the model file
carries (kept only when cross-validation says it helps), then Platt scaling and the threshold
are fitted under a rule chosen so that the promised sensitivity holds on held-out patients
(:mod:`pneumoscan.train.promise`). Optionally (``--unlabelled``) batch-norm statistics are
re-estimated first. The figures on the sample itself are optimistic (the threshold was chosen
on those images), so a patient-grouped cross-validated estimate of the whole procedure is
reported beside them, per pneumonia subtype too.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscan.constants import (
    CLASSES,
    DEFAULT_BACTERIAL_SENSITIVITY,
    DEFAULT_CONFIDENCE,
    DEFAULT_HEAD_TRAIN_IMAGES,
    DEFAULT_SITE_TARGET_SENSITIVITY,
)
from pneumoscan.data.cache import cached_decode
from pneumoscan.data.dataset import (
    data_fingerprint,
    empty_classes,
    file_sha1,
    scan_dataset,
    select_split,
)
from pneumoscan.data.pipeline import decode_all, iter_decoded_batches
from pneumoscan.data.preprocess import to_model_input
from pneumoscan.errors import DatasetError, OutputExistsError
from pneumoscan.inference.backends import open_model
from pneumoscan.inference.calibration import (
    apply_temperature,
    fit_scaling_and_threshold,
)
from pneumoscan.inference.export import export_onnx
from pneumoscan.inference.predict import expand_inputs
from pneumoscan.inference.scorer import Scorer, forward_paths, score_files, subtype_head
from pneumoscan.inference.subtype import fit_subtype_point
from pneumoscan.metrics import binary_metrics, expected_calibration_error, wilson_interval
from pneumoscan.models.head_prior import read_head_prior
from pneumoscan.models.modelfile import (
    SITE_SAMPLE,
    LoadedModel,
    OperatingPoint,
    load_model,
    now_utc,
    save_model,
    write_metadata,
)
from pneumoscan.models.subtype import subtype_targets
from pneumoscan.progress import Reporter
from pneumoscan.train.promise import (
    CONFIDENCES,
    MAX_FAILURE_RATE,
    choose_rule,
    pneumonia_images_needed,
    split_check,
    support_warning,
)

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
    subtypes: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """Held-out figures of the whole refit, by repeated patient-grouped cross-validation.

    Each repeat fits on 4/5 of the patients and scores the rest, so every image is scored
    once per repeat by a refit that never saw its patient. Rates are averaged over repeats;
    their intervals are Wilson intervals at the sample's size (the repeats reuse the same
    images, so they narrow nothing), and ``sensitivity_range`` shows the spread of repeats.
    With ``subtypes``, ``per_subtype`` gives each pneumonia subtype's sensitivity the same way.

    Returns:
        ``None`` when a class has fewer than two images (no fold can hold both).
    """
    folds = min(CV_FOLDS, int(np.bincount(y_true, minlength=2).min()))
    if folds < 2:
        return None
    n_pos, n_neg = int(y_true.sum()), int((1 - y_true).sum())
    kinds = [] if subtypes is None else sorted(set(np.asarray(subtypes)[y_true == 1]))
    sens, spec, eces = [], [], []
    by_kind: dict[str, list[float]] = {kind: [] for kind in kinds}
    for p_held_out, predicted in held_out_repeats(
        y_true, p_raw, patients, target, confidence, folds, repeats, seed
    ):
        sens.append(np.sum(predicted & (y_true == 1)) / n_pos)
        spec.append(np.sum(~predicted & (y_true == 0)) / n_neg)
        eces.append(expected_calibration_error(y_true, p_held_out))
        for kind in kinds:
            by_kind[kind].append(float(predicted[(y_true == 1) & (subtypes == kind)].mean()))
    sensitivity, specificity = float(np.mean(sens)), float(np.mean(spec))
    per_subtype = {}
    for kind, values in by_kind.items():
        n_kind = int(np.sum((y_true == 1) & (subtypes == kind)))
        rate = float(np.mean(values))
        per_subtype[kind] = {
            "n": n_kind,
            "sensitivity": rate,
            "sensitivity_ci": wilson_interval(round(rate * n_kind), n_kind),
        }
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
        "per_subtype": per_subtype,
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


def calibration_sample_overlap(
    metadata: Mapping[str, Any], paths: Sequence[str | Path]
) -> dict[str, Any] | None:
    """Whether a site-calibrated model is being evaluated on its own calibration sample.

    Its threshold (and a refitted head) were fitted on those images, so figures on them are
    in-sample: the cross-validated expectation stored at calibration is what to quote instead.

    Returns:
        ``None`` when no image is in the sample (or the model was not site-calibrated), else
        ``overlap`` (images of the sample among ``paths``), ``n``, the stored ``expected``
        (cross-validated) figures and a ``warning`` sentence.
    """
    site = metadata.get("site_calibration") or {}
    recorded = set(site.get("files") or ())
    if not recorded:
        return None
    overlap = sum(file_sha1(path)[:16] in recorded for path in paths)
    if overlap == 0:
        return None
    expected = site.get("cross_validated")
    warning = (
        f"{overlap} of {len(paths)} images are this model's site-calibration sample: its "
        "threshold and calibration were fitted on them, so the figures here are in-sample "
        "and optimistic"
    )
    if expected:
        low_sens, high_sens = expected["sensitivity_ci"]
        low_spec, high_spec = expected["specificity_ci"]
        warning += (
            f". Expected on new images of the site (cross-validated at calibration): "
            f"sensitivity {expected['sensitivity']:.3f} ({low_sens:.3f}-{high_sens:.3f}), "
            f"specificity {expected['specificity']:.3f} ({low_spec:.3f}-{high_spec:.3f})"
        )
    return {"overlap": overlap, "n": len(paths), "expected": expected, "warning": warning}


def calibrate_to_site(
    model: str | Path | None,
    data: str | Path,
    out: str | Path,
    target_sensitivity: float = DEFAULT_SITE_TARGET_SENSITIVITY,
    batch_size: int = 32,
    reporter: Reporter | None = None,
    unlabelled: str | Path | None = None,
    confidence: float | None = None,
    export: bool = True,
    refit_head: bool = True,
    train_data: str | Path | None = None,
    train_images: int = DEFAULT_HEAD_TRAIN_IMAGES,
    overwrite: bool = False,
    subtype: bool = False,
    subtype_target: float = DEFAULT_BACTERIAL_SENSITIVITY,
) -> dict[str, Any]:
    """Adapt a model to a site's labelled sample and save it as a new model file.

    By default the final layer is refitted on the site's features together with training
    features the model file carries (kept only when patient-grouped cross-validation says it
    ranks the site's images better; :func:`pneumoscan.train.adapt.refit_head`), then Platt
    scaling and the threshold are fitted. The threshold rule is chosen by the split check
    (:mod:`pneumoscan.train.promise`): the least conservative rule that, fitted on one half
    of the sample's patients, delivered the target sensitivity on the other half in at least
    95% of the splits.

    Args:
        model: Model file or run folder (default: the shipped model).
        data: Folder with ``NORMAL/`` and ``PNEUMONIA/`` (or a dataset root: all splits used).
        out: Path of the calibrated model file to write (the input is never modified).
        target_sensitivity: Sensitivity the site should get on new images.
        batch_size: Images scored at a time.
        reporter: Progress and warnings sink.
        unlabelled: Folder of the site's unlabelled X-rays (searched recursively): batch-norm
            statistics are re-estimated on them first (not for frozen batch norm).
        confidence: One-sided confidence with which the sample's sensitivity must reach the
            target (see :func:`pneumoscan.inference.calibration.threshold_with_confidence`);
            ``None`` chooses it by the split check.
        export: Also write the float32 ONNX export beside ``out`` (``OUT.onnx``), so that
            ``predict`` keeps its TensorFlow-free path for the calibrated model.
        refit_head: Refit the final layer (skipped, with a warning, when the model carries no
            training features and ``train_data`` is not given).
        train_data: Training data for the head refit when the model carries no features.
        train_images: How many training images (a seeded sample) that fallback uses.
        overwrite: Replace ``out`` (and its ONNX export) when they exist.
        subtype: Also refit the subtype head's calibration and threshold on the sample's
            pneumonias whose file names name the cause, by the same split check
            (:func:`refit_subtype_on_site`).
        subtype_target: Bacterial sensitivity the subtype call should keep.

    Returns:
        ``before``, ``after`` (on the sample itself, as ``predict`` scores it),
        ``cross_validated`` (expected figures on new images of the site, per subtype too),
        ``promise`` (the split check of the chosen rule), the new ``temperature``,
        ``logit_bias`` and ``threshold``, warnings (or ``None``), and with ``subtype`` the
        subtype refit's record (``subtype``).

    Raises:
        DatasetError: A class has no readable image, ``out`` is the input model, or the
            subtype refit was asked of a model without a subtype head or a sample without
            named bacterial and viral pneumonias.
        OutputExistsError: ``out`` or its export exists and ``overwrite`` is off.
    """

    reporter = reporter or Reporter(quiet=True)
    out = Path(out)
    loaded = load_model(model)
    _check_outputs(loaded.path, out, export, overwrite)
    if subtype and subtype_head(loaded) is None:
        raise DatasetError(f"{loaded.path} has no subtype head to calibrate (--subtype)")
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
    patients = table["patient_id"].to_numpy()
    subtypes = table["subtype"].to_numpy().astype(str)
    p_raw, before_raw = p_raw[scored], before_raw[scored]
    final_raw = p_raw
    head: dict[str, Any] | None = None
    if refit_head:
        head = _refit_head(loaded, table, y_true, p_raw, train_data, train_images, reporter)
    if head is not None:
        # The threshold is fitted on out-of-fold scores, as new site images will see the head.
        p_raw, final_raw = head.pop("oof_raw"), head.pop("final_raw")

    before = operating_figures(
        y_true,
        apply_temperature(before_raw, loaded.temperature, loaded.logit_bias),
        loaded.threshold,
    )
    with reporter.task("checking the promise on patient splits", total=1) as advance:
        checks = split_check(
            y_true, p_raw, patients, subtypes, target_sensitivity,
            confidences=CONFIDENCES if confidence is None else (confidence,),
        )  # fmt: skip
        advance(1)
    chosen, supported = choose_rule(checks)
    temperature, bias, threshold = fit_scaling_and_threshold(
        y_true, p_raw, target_sensitivity, chosen.confidence
    )
    after = operating_figures(y_true, apply_temperature(final_raw, temperature, bias), threshold)
    warning = sample_size_warning(int(y_true.sum()), target_sensitivity)
    cross_validated = cross_validated_figures(
        y_true, p_raw, patients, target_sensitivity, confidence=chosen.confidence,
        subtypes=subtypes,
    )  # fmt: skip
    short = target_warning(cross_validated, target_sensitivity)
    support = support_warning(
        chosen, supported, target_sensitivity, int(y_true.sum()),
        cross_validated["specificity"] if cross_validated else after["specificity"],
    )  # fmt: skip
    result: dict[str, Any] = {
        "model": str(loaded.path),
        "data": str(data),
        "n": len(y_true),
        "n_pneumonia": int(y_true.sum()),
        "target_sensitivity": target_sensitivity,
        "confidence": chosen.confidence,
        "confidence_rule": "chosen by the split check" if confidence is None else "given",
        "temperature": temperature,
        "logit_bias": bias,
        "threshold": threshold,
        "before": before,
        "after": after,
        "cross_validated": cross_validated,
        "promise": {
            "max_failure_rate": MAX_FAILURE_RATE,
            "supported": supported,
            "chosen": chosen.to_dict(),
            "rules": [check.to_dict() for check in checks],
        },
        "warning": warning,
        "target_warning": short,
        "support_warning": support,
        "batch_norm_adaptation": adapted,
        "head_refit": head,
    }
    if subtype:
        result["subtype"] = refit_subtype_on_site(
            loaded, table, subtype_target, confidence, batch_size, reporter
        )
    for message in (warning, short, support):
        if message:
            reporter.warn(message)
    _save_calibrated(loaded, out, result, table)
    if export:
        with reporter.task("writing the ONNX export beside it", total=1) as advance:
            result["onnx"] = str(export_onnx(out, out.with_suffix(".onnx")).path)
            advance(1)
    result["after"] = _on_scoring_path(out, table, y_true, after, batch_size, reporter)
    return result


def refit_subtype_on_site(
    loaded: LoadedModel,
    table: Any,
    target: float,
    confidence: float | None,
    batch_size: int,
    reporter: Reporter,
) -> dict[str, Any]:
    """The subtype head's calibration and threshold refitted on the sample's named pneumonias,
    under the main promise's rules: the split check chooses the confidence (the least
    conservative one whose check halves kept the bacterial sensitivity in 95% of patient
    splits; ``confidence`` fixes it), and repeated patient-grouped cross-validation gives the
    figures to expect. The head's weights are kept.

    Returns:
        The record (``head``: the new metadata entry, popped when saved).

    Raises:
        DatasetError: No bacterial or no viral pneumonia is named in the sample.
    """
    head = subtype_head(loaded)
    if head is None:
        raise DatasetError(f"{loaded.path} has no subtype head")
    viral, known = subtype_targets(table["subtype"].to_numpy())
    named = table[known]
    is_bacterial = 1 - viral[known].astype(int)
    if len(np.unique(is_bacterial)) < 2 or min(np.bincount(is_bacterial, minlength=2)) < 2:
        raise DatasetError(
            "the subtype refit needs bacterial and viral pneumonias named in the file names "
            f"(found {int(is_bacterial.sum())} bacterial, {int((1 - is_bacterial).sum())} viral)"
        )
    paths = named["path"].tolist()
    with reporter.task("subtype: features of the named pneumonias", total=len(paths)) as advance:
        features = forward_paths(Scorer(loaded), paths, batch_size, advance).features
    if features is None or np.isnan(features).any():
        raise DatasetError("a site image became unreadable during calibration; run it again")
    raw = head.raw_bacterial(features)
    patients = named["patient_id"].to_numpy()
    kinds = np.where(is_bacterial == 1, "bacteria", "virus")
    checks = split_check(
        is_bacterial, raw, patients, kinds, target,
        confidences=CONFIDENCES if confidence is None else (confidence,),
    )  # fmt: skip
    chosen, supported = choose_rule(checks)
    rule = "chosen by the split check" if confidence is None else "given"
    refitted = fit_subtype_point(
        head,
        is_bacterial,
        raw,
        target,
        split="site sample pneumonias of named cause",
        fitted_on=SITE_SAMPLE,
        threshold_rule=(
            f"highest threshold whose site-sample bacterial sensitivity has a one-sided "
            f"{chosen.confidence:.0%} lower bound >= {target} ({rule})"
        ),
        confidence=chosen.confidence,
    )
    expected = cross_validated_figures(
        is_bacterial, raw, patients, target, confidence=chosen.confidence
    )
    warning = None
    if not supported:
        warning = (
            f"subtype: no rule kept a bacterial sensitivity of {target:.0%} in "
            f"{1 - MAX_FAILURE_RATE:.0%} of patient splits of this sample (the most careful "
            f"fell short in {chosen.failure_rate:.0%}), so the most careful rule is used and "
            f"calls few viral; about {pneumonia_images_needed(target)} bacterial pneumonias "
            "(with viral ones in proportion) would let the margin narrow"
        )
        reporter.warn(warning)
    return {
        "n_bacterial": int(is_bacterial.sum()),
        "n_viral": int((1 - is_bacterial).sum()),
        "target_bacterial_sensitivity": target,
        "confidence": chosen.confidence,
        "confidence_rule": rule,
        "threshold": refitted.point.threshold,
        "after": operating_figures(
            is_bacterial,
            apply_temperature(raw, refitted.point.temperature, refitted.point.logit_bias),
            refitted.point.threshold,
        ),
        "cross_validated": expected,
        "promise": {"supported": supported, "chosen": chosen.to_dict()},
        "warning": warning,
        "head": refitted.to_metadata(),
    }


def _check_outputs(source: Path, out: Path, export: bool, overwrite: bool) -> None:
    """Refuse to write over the input model, or over existing files unless asked."""
    if out.resolve() == source.resolve():
        raise DatasetError(f"{out}: choose a new file; the input model is kept unchanged")
    if overwrite:
        return
    for path in (out, out.with_suffix(".onnx")) if export else (out,):
        if path.exists():
            raise OutputExistsError(f"{path} exists; choose a new --out or pass --overwrite")


def _on_scoring_path(
    out: Path,
    table: Any,
    y_true: np.ndarray,
    fitted: dict[str, Any],
    batch_size: int,
    reporter: Reporter,
) -> dict[str, Any]:
    """The sample's figures as ``predict --model OUT`` scores it (its ONNX export when there is
    one), so that what calibrate prints is what the scoring path gives."""
    scoring, _, _ = open_model(out, "auto")
    paths = table["path"].tolist()
    p_scoring = _scores(scoring, paths, batch_size, reporter, "scoring the sample as predict will")
    figures = operating_figures(y_true, p_scoring, fitted["threshold"])
    figures["backend"] = type(scoring).__name__
    if figures["confusion_matrix"] != fitted["confusion_matrix"]:
        reporter.warn(
            f"on the scoring path ({figures['backend']}) the sample's confusion matrix is "
            f"{figures['confusion_matrix']}, against {fitted['confusion_matrix']} when fitted"
        )
    return figures


def _refit_head(
    loaded: LoadedModel,
    table: Any,
    y_true: np.ndarray,
    p_raw: np.ndarray,
    train_data: str | Path | None,
    train_images: int,
    reporter: Reporter,
) -> dict[str, Any] | None:
    """Refit the network's final layer in place (when cross-validation says it helps).

    Returns:
        The refit's record with ``oof_raw`` and ``final_raw`` site scores, or ``None`` (with a
        warning) when neither the model nor ``train_data`` gives training features.
    """
    # lazy: loads TensorFlow
    from pneumoscan.train.adapt import pooled_features, refit_head, set_binary_head

    def features(pixels: np.ndarray) -> np.ndarray:
        batches = (to_model_input(pixels[i : i + 64]) for i in range(0, len(pixels), 64))
        return pooled_features(loaded.network, batches)

    prior = read_head_prior(loaded.path)
    if prior is not None and train_data is None:
        train_x, train_y, source = prior.features, prior.labels, "carried in the model file"
    else:
        found = _training_features(loaded, train_data, train_images, features, reporter)
        if found is None:
            return None
        train_x, train_y, source = found
    site_pixels, site_kept, _ = decode_all(table["path"].tolist(), loaded.preprocess)
    if len(site_kept) != len(table):
        raise DatasetError("a site image became unreadable during calibration; run it again")
    site_x = features(site_pixels)
    fitted = refit_head(train_x, train_y, site_x, y_true, table["patient_id"].to_numpy(), p_raw)
    coef, intercept = fitted.pop("coef", None), fitted.pop("intercept", None)
    fitted["final_raw"] = p_raw
    if coef is not None and intercept is not None:
        set_binary_head(loaded.network, coef, intercept)
        fitted["final_raw"] = expit(site_x @ coef + intercept)
    reporter.info(
        "head refit: out-of-fold site AUC "
        + ", ".join(f"{k} {v:.4f}" for k, v in fitted["candidates"].items())
        + f"; kept {fitted['chosen']}"
    )
    return fitted | {"train_images": len(train_y), "train_features": source}


def _training_features(
    loaded: LoadedModel,
    train_data: str | Path | None,
    train_images: int,
    features: Any,
    reporter: Reporter,
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Pooled features of a seeded sample of the model's training images in ``train_data``
    (default: the recorded root), or ``None`` with a warning when they are not here."""
    root = train_data or loaded.training_data_root
    if not root or not Path(root).exists():
        if train_data is not None:
            raise DatasetError(f"{train_data}: training data folder not found")
        reporter.warn(
            f"{loaded.path.name} carries no training features and its training data "
            f"({root}) is not here: the final layer is not refitted, only the operating point"
        )
        return None
    train = select_split(scan_dataset(root), "train", loaded.metadata)
    train = train[train["error"] == ""]
    train = train.sample(n=min(train_images, len(train)), random_state=0).reset_index(drop=True)
    with reporter.task("head refit: training features", total=len(train)) as advance:
        train_pixels, kept, _ = cached_decode(train["path"].tolist(), loaded.preprocess, None)
        advance(len(train) // 2)
        train_x = features(train_pixels)
        advance(len(train) - len(train) // 2)
    train_y = (train["label"].to_numpy()[kept] == CLASSES[1]).astype(int)
    return train_x, train_y, str(root)


def _scores(
    model: Any,
    paths: list[str],
    batch_size: int,
    reporter: Reporter,
    task: str = "scoring the labelled sample",
    calibrated: bool = True,
) -> np.ndarray:
    """P(pneumonia) per path on ``model`` (raw with ``calibrated=False``); NaN, with a
    warning, where a file cannot be read."""
    p = np.full(len(paths), np.nan)
    with reporter.task(task, total=len(paths)) as advance:
        for score in score_files(model, paths, batch_size=batch_size, calibrated=calibrated):
            if score.probability is None:
                reporter.warn(f"skipped {score.error}")
            else:
                p[score.position] = score.probability
            advance(1)
    return p


def _raw_scores(
    loaded: LoadedModel, paths: list[str], batch_size: int, reporter: Reporter
) -> np.ndarray:
    """Uncalibrated P(pneumonia) per path; NaN where a file cannot be read."""
    return _scores(loaded, paths, batch_size, reporter, calibrated=False)


def _adapt(
    loaded: LoadedModel, folder: Path, batch_size: int, reporter: Reporter
) -> dict[str, Any]:
    """Re-estimate batch-norm statistics on every readable image under ``folder``."""
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


def _save_calibrated(loaded: LoadedModel, out: Path, result: dict[str, Any], table: Any) -> None:
    source, metadata = loaded.path, loaded.metadata
    out.parent.mkdir(parents=True, exist_ok=True)
    head = result.get("head_refit")
    if result["batch_norm_adaptation"] or (head and head["chosen"] != "original"):
        # The OOD detector and the head prior travel with the re-saved network.
        save_model(loaded.network, out, metadata, members_from=source)
    else:
        shutil.copyfile(source, out)
    keys = ("data", "n", "n_pneumonia", "confidence", "before", "after", "cross_validated")
    # The new head entry replaces the model's; its record stays in the site calibration.
    subtype_entry = result["subtype"].pop("head") if result.get("subtype") else None
    site = {k: result[k] for k in keys} | {
        "subtype": result.get("subtype"),
        "batch_norm_adaptation": result["batch_norm_adaptation"],
        "head_refit": result.get("head_refit"),
        "promise": {k: result["promise"][k] for k in ("max_failure_rate", "supported", "chosen")},
        # Content hashes, not names (a hospital's file names may carry patient identifiers):
        # `evaluate` recognises the calibration sample by them and says its figures are
        # in-sample.
        "files": sorted(file_sha1(path)[:16] for path in table["path"]),
    }
    point = OperatingPoint(
        threshold=result["threshold"],
        temperature=result["temperature"],
        logit_bias=result["logit_bias"],
        threshold_rule=(
            f"highest threshold whose site-sample sensitivity has a one-sided "
            f"{result['confidence']:.0%} lower bound >= {result['target_sensitivity']} "
            f"({result['confidence_rule']})"
        ),
        target_sensitivity=result["target_sensitivity"],
        confidence=result["confidence"],
        fitted_on=SITE_SAMPLE,
    )
    updated = (
        metadata
        | point.to_metadata()
        | {
            "site_calibration": site
            | {"fingerprint": data_fingerprint(table), "date": now_utc(), "source": str(source)},
        }
    )
    if subtype_entry is not None:
        updated["subtype"] = subtype_entry
    write_metadata(out, updated)
