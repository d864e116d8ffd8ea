"""Fitting the out-of-distribution detector (:mod:`pneumoscan.inference.ood`) on a model's training
images, and checking folders against it: the I/O side of the check (``pneumoscan fit-ood``)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.constants import CLASSES, OOD_MEMBER, POSITIVE_INDEX
from pneumoscan.data.dataset import scan_dataset
from pneumoscan.data.pipeline import iter_decoded
from pneumoscan.data.preprocess import DecodedImage, DecodeFailure
from pneumoscan.errors import DatasetError, InvalidInputError
from pneumoscan.inference.ood import (
    ASPECT_RANGE,
    DEFAULT_COMPONENTS,
    DEFAULT_RETENTION,
    MAX_COLOUR_SPREAD,
    METHOD,
    MIN_GREY_SPREAD,
    MIN_POLARITY,
    OodDetector,
    appearance_features,
    cheap_reasons,
    fit_detector,
    ood_feature_layers,
)
from pneumoscan.inference.predict import expand_inputs, predict_files
from pneumoscan.inference.scorer import Scorer
from pneumoscan.models.efficientnet_lite import TOP_ACTIVATION
from pneumoscan.models.head_prior import sample_head_prior, write_head_prior
from pneumoscan.models.modelfile import load_model, now_utc, write_member, write_metadata
from pneumoscan.progress import Reporter


def _fit_table(data: str | Path) -> Any:
    """The model's training images in ``data``: every split but ``test``."""
    table = scan_dataset(data, read_headers=False)
    table = table[table["split"] != "test"].reset_index(drop=True)
    if table.empty:
        raise DatasetError(f"{data}: no training images (only a test split)")
    return table


@dataclass
class _Extracted:
    appearance: np.ndarray
    features: np.ndarray | None
    cheap: list[str | None]
    kept: list[int]
    errors: list[DecodeFailure]


def _extract(
    scorer: Any,
    paths: Sequence[str],
    config: Any,
    batch_size: int,
    advance: Any,
) -> _Extracted:
    """Appearance features, network features and cheap-check results of readable images."""
    appearance, features, cheap, kept, errors = [], [], [], [], []
    for start, items in iter_decoded(paths, config, batch_size):
        decoded = [item for item in items if isinstance(item, DecodedImage)]
        for offset, item in enumerate(items):
            if isinstance(item, DecodeFailure):
                errors.append(item)
            else:
                kept.append(start + offset)
        if decoded:
            display = np.stack([d.display for d in decoded])
            appearance.append(appearance_features(display))
            sizes = [d.original_size for d in decoded]
            cheap.extend(cheap_reasons(display, sizes, polarity_check=False))
            forward = scorer.forward(np.stack([d.pixels for d in decoded]))
            if forward.features is not None:
                features.append(forward.features)
        advance(len(items))
    if not kept:
        raise InvalidInputError("none of the images could be read")
    return _Extracted(
        np.concatenate(appearance),
        np.concatenate(features) if features else None,
        cheap,
        kept,
        errors,
    )


def check_folder(
    model: Any,
    detector: OodDetector,
    folder: str | Path,
    batch_size: int = 64,
) -> dict[str, Any]:
    """How many images of a folder of X-rays (e.g. another site's) the check rejects."""
    files, _ = expand_inputs([folder])
    results = list(predict_files(model, files, batch_size, detector=detector))
    rejected = [r for r in results if r.status == "rejected"]
    return {
        "n": sum(r.status != "error" for r in results),
        "rejected": len(rejected),
        "unreadable": sum(r.status == "error" for r in results),
        "rejected_files": [{"path": r.path, "reason": r.reason} for r in rejected],
    }


def fit_ood(
    model: str | Path | None,
    data: str | Path,
    out: str | Path,
    checks: Sequence[str | Path] = (),
    retention: float = DEFAULT_RETENTION,
    n_components: int = DEFAULT_COMPONENTS,
    batch_size: int = 64,
    reporter: Any = None,
) -> dict[str, Any]:
    """Fit the OOD detector on a model's training images and store it in a model file.

    Args:
        model: Model file or run folder (default: the shipped model).
        data: The data set the model was trained on (every split but ``test`` is used).
        out: Model file to write: a copy of ``model`` with the detector (may be ``model``).
        checks: Folders of X-rays that must pass (e.g. another site's sample); their
            rejection counts are reported and stored, not used for fitting.
        retention: Target share of training images accepted.
        n_components: Principal directions of each PPCA.
        batch_size: Images per forward pass.
        reporter: Progress sink (:class:`pneumoscan.progress.Reporter`).

    Returns:
        The ``ood`` metadata written into ``out``.
    """
    reporter = reporter or Reporter(quiet=True)
    loaded = load_model(model)
    layers = ood_feature_layers(loaded.network)
    table = _fit_table(data)
    paths = table["path"].tolist()
    scorer = Scorer(loaded, layers)
    with reporter.task("features of the training images", total=len(paths)) as advance:
        extracted = _extract(scorer, paths, loaded.preprocess, batch_size, advance)
    groups = table["patient_id"].to_numpy()[extracted.kept]
    detector, report = fit_detector(
        extracted.appearance, extracted.features, groups, layers, retention, n_components
    )
    cheap_rejected = np.array([reason is not None for reason in extracted.cheap])
    # In-sample rates of the final detector (with the cheap checks), next to the out-of-fold
    # estimate: the first is optimistic, the second honest.
    appearance, network = detector.ratios(extracted.appearance, extracted.features)
    combined = appearance if network is None else np.maximum(appearance, network)
    in_sample = cheap_rejected | (combined > 1.0)
    metadata = dict(loaded.metadata)
    ood: dict[str, Any] = {
        "method": METHOD,
        "threshold": 1.0,
        "score": "max(appearance, features) distance over its threshold; above 1 is rejected",
        "appearance_threshold": detector.appearance_threshold,
        "features_threshold": detector.features_threshold,
        "layers": detector.layers,
        "retention": retention,
        "n_components": n_components,
        "cheap_checks": {
            "min_grey_spread": MIN_GREY_SPREAD,
            "max_colour_spread": MAX_COLOUR_SPREAD,
            "aspect_range": list(ASPECT_RANGE),
            "min_polarity": MIN_POLARITY,
        },
        "fitted_on": {
            "data": str(data),
            "n_images": report.n_images,
            "n_patients": report.n_patients,
            "unreadable": len(extracted.errors),
        },
        "training_rejection": {
            "out_of_fold": report.out_of_fold_rejection,
            "in_sample": float(in_sample.mean()),
            "cheap_checks": float(cheap_rejected.mean()),
        },
        "fitted": now_utc(),
    }
    out = Path(out)
    if out.resolve() != loaded.path.resolve():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(loaded.path, out)
    write_member(out, OOD_MEMBER, detector.to_npz())
    if extracted.features is not None and layers == [TOP_ACTIVATION]:
        # The detector's features are the final layer's input: a sample of them is what
        # `calibrate` refits that layer with at a site that has no access to our training data.
        labels = table["label"].to_numpy()[extracted.kept] == CLASSES[POSITIVE_INDEX]
        prior = sample_head_prior(extracted.features, labels.astype(int))
        write_head_prior(out, prior)
        ood["head_prior"] = {"n_images": len(prior.labels), "features": prior.features.shape[1]}
    ood["checks"] = {}
    for folder in checks:
        found = check_folder(loaded, detector, folder, batch_size)
        ood["checks"][str(folder)] = {k: v for k, v in found.items() if k != "rejected_files"}
        ood["checks"][str(folder)]["rejected_files"] = found["rejected_files"][:20]
    metadata["ood"] = ood
    write_metadata(out, metadata)
    return ood
