"""The site-sample protocol of issue 11: every figure with its interval, fitted steps
cross-validated by patient.

Usage:
    python benchmarks/site_protocol.py NETWORK [NETWORK ...] [--ensemble] [--json OUT]

NETWORK is a model file, a run folder, or a training checkpoint (``checkpoints/epoch-N.keras``,
which has no metadata). For each one (and, with ``--ensemble``, for the mean of their raw
P(pneumonia)) it prints, on ``../shared/data/site_sample``:

* ROC AUC with its 95% bootstrap interval (patients resampled);
* the best specificity at 95% and 97% sensitivity (read off the ROC curve: threshold-free and
  optimistic, for comparing networks);
* the whole ``pneumoscan calibrate`` refit (Platt scaling + threshold for 95% and 97%
  sensitivity), estimated by 10x repeated 5-fold patient-grouped cross-validation, for the
  one-sided confidence margins 0.5 (none), 0.8, 0.9 and 0.95, with specificity per source
  series (``NORMAL2-IM`` / ``IM``).

With ``--adabn`` each network is also scored after AdaBN (``calibrate --unlabelled``),
cross-fitted: batch-norm statistics re-estimated on one half of the site's patients score the
other half, so no image is scored by statistics it helped estimate.

Raw scores are cached beside the JSON, keyed by the network file, so an ensemble of networks
already scored costs nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import SHARED_DATA, machine

from pneumoscan.constants import CLASSES
from pneumoscan.data.dataset import scan_dataset, source_from_name
from pneumoscan.data.pipeline import decode_all
from pneumoscan.data.preprocess import PreprocessConfig
from pneumoscan.metrics import (
    bootstrap_replicates,
    percentile_interval,
    safe_roc_auc,
    specificity_at_sensitivity,
    weighted_roc_auc,
    wilson_interval,
)
from pneumoscan.train.site import held_out_repeats

CONFIDENCES = (0.5, 0.8, 0.9, 0.95)
TARGETS = (0.95, 0.97)


def _network_file(path: Path) -> Path:
    return path / "model.keras" if path.is_dir() else path


def raw_scores(path: Path, pixels: np.ndarray, cache: Path) -> np.ndarray:
    """The network's raw P(pneumonia) on ``pixels``, cached by file path and mtime."""
    file = _network_file(path)
    key = cache / (str(file.resolve()).strip("/").replace("/", "__") + ".npy")
    stamp = key.with_suffix(".mtime")
    if key.exists() and stamp.exists() and stamp.read_text() == str(file.stat().st_mtime):
        return np.load(key)
    import keras

    import pneumoscan.models  # noqa: F401  (registers the custom layers)
    from pneumoscan.data.augment import unwrap
    from pneumoscan.train.callbacks import predict_pixels

    network = unwrap(keras.saving.load_model(file, compile=False))
    scores = predict_pixels(network, pixels)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(key, scores)
    stamp.write_text(str(file.stat().st_mtime))
    return scores


def adabn_cross_fitted(path: Path, pixels: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Raw scores after AdaBN fitted on the other half of the patients (2-fold)."""
    import keras

    import pneumoscan.models  # noqa: F401
    from pneumoscan.data.augment import unwrap
    from pneumoscan.data.preprocess import to_model_input
    from pneumoscan.train.adapt import adapt_batch_norm
    from pneumoscan.train.callbacks import predict_pixels

    unique = np.unique(patients)
    half = set(np.random.default_rng(0).permutation(unique)[: len(unique) // 2])
    first = np.array([p in half for p in patients])
    scores = np.empty(len(pixels))
    for fit in (first, ~first):
        network = unwrap(keras.saving.load_model(_network_file(path), compile=False))
        fit_pixels = pixels[fit]
        adapt_batch_norm(
            network,
            (to_model_input(fit_pixels[i : i + 32]) for i in range(0, len(fit_pixels), 32)),
        )
        scores[~fit] = predict_pixels(network, pixels[~fit])
    return scores


def cv_refit(
    y: np.ndarray,
    p_raw: np.ndarray,
    patients: np.ndarray,
    sources: np.ndarray,
    target: float,
    confidence: float,
    repeats: int = 10,
) -> dict[str, float]:
    """Held-out sensitivity, specificity (overall and per source) of the calibrate refit,
    from the same repeated folds ``pneumoscan calibrate`` reports."""
    sens, spec, per_source = [], [], {s: [] for s in sorted(set(sources[y == 0]))}
    for _, flagged in held_out_repeats(y, p_raw, patients, target, confidence, 5, repeats):
        sens.append(flagged[y == 1].mean())
        spec.append((~flagged[y == 0]).mean())
        for source, values in per_source.items():
            values.append((~flagged[(y == 0) & (sources == source)]).mean())
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    return {
        "sensitivity": float(np.mean(sens)),
        "sensitivity_ci": wilson_interval(round(np.mean(sens) * n_pos), n_pos),
        "sensitivity_worst_repeat": float(np.min(sens)),
        "specificity": float(np.mean(spec)),
        "specificity_ci": wilson_interval(round(np.mean(spec) * n_neg), n_neg),
        **{f"specificity_{s}": float(np.mean(v)) for s, v in per_source.items()},
    }


def auc_with_interval(
    y: np.ndarray, p_raw: np.ndarray, patients: np.ndarray
) -> tuple[float, tuple[float, float]]:
    """ROC AUC and its 95% bootstrap interval (2,000 patient resamples)."""
    replicates = bootstrap_replicates(y, [p_raw], [weighted_roc_auc], patients, 2000, 0)[0, 0]
    low, high = percentile_interval(replicates)
    return safe_roc_auc(y, p_raw), (low, high)


def describe(
    name: str,
    y: np.ndarray,
    p_raw: np.ndarray,
    patients: np.ndarray,
    sources: np.ndarray,
    subtypes: np.ndarray,
) -> dict[str, object]:
    auc, interval = auc_with_interval(y, p_raw, patients)
    row: dict[str, object] = {"name": name, "auc": auc, "auc_ci": interval}
    # Each subtype against the normals: viral pneumonia is where the new site's misses are.
    for kind in ("bacteria", "virus"):
        keep = (y == 0) | (subtypes == kind)
        row[f"auc_{kind}_vs_normal"], row[f"auc_{kind}_vs_normal_ci"] = auc_with_interval(
            y[keep], p_raw[keep], patients[keep]
        )
    for target in TARGETS:
        row[f"best_spec_at_{target}"] = specificity_at_sensitivity(y, p_raw, target)
    for target in TARGETS:
        for confidence in CONFIDENCES:
            row[f"cv_{target}_{confidence}"] = cv_refit(
                y, p_raw, patients, sources, target, confidence
            )
    return row


def _print(row: dict[str, object]) -> None:
    low, high = row["auc_ci"]  # type: ignore[misc]
    subtypes = "; ".join(
        f"{kind}-vs-normal AUC {row[f'auc_{kind}_vs_normal']:.4f} "
        f"({row[f'auc_{kind}_vs_normal_ci'][0]:.3f}-{row[f'auc_{kind}_vs_normal_ci'][1]:.3f})"  # type: ignore[index]
        for kind in ("bacteria", "virus")
    )
    print(
        f"\n{row['name']}\n  site AUC {row['auc']:.4f} (95% CI {low:.3f}-{high:.3f}); "
        f"{subtypes}\n  best specificity at sensitivity 0.95: {row['best_spec_at_0.95']:.3f}, "
        f"at 0.97: {row['best_spec_at_0.97']:.3f}"
    )
    for target in TARGETS:
        for confidence in CONFIDENCES:
            cv = row[f"cv_{target}_{confidence}"]
            assert isinstance(cv, dict)
            per_source = ", ".join(
                f"{k.removeprefix('specificity_')} {v:.3f}"
                for k, v in cv.items()
                if k.startswith("specificity_") and not k.endswith("_ci")
            )
            print(
                f"  calibrate target {target}, confidence {confidence}: cross-validated "
                f"sensitivity {cv['sensitivity']:.3f} (worst repeat "
                f"{cv['sensitivity_worst_repeat']:.3f}), specificity {cv['specificity']:.3f} "
                f"[{per_source}]"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("networks", nargs="+", type=Path)
    parser.add_argument("--site", type=Path, default=SHARED_DATA / "site_sample")
    parser.add_argument("--ensemble", action="store_true", help="Also score the mean.")
    parser.add_argument("--json", type=Path, default=Path("runs/site_protocol.json"))
    parser.add_argument("--adabn", action="store_true", help="Also score after AdaBN.")
    args = parser.parse_args()

    table = scan_dataset(args.site)
    table = table[table["error"] == ""].reset_index(drop=True)
    pixels, kept, _ = decode_all(table["path"].tolist(), PreprocessConfig())
    table = table.iloc[kept].reset_index(drop=True)
    y = (table["label"] == CLASSES[1]).to_numpy().astype(int)
    patients = table["patient_id"].to_numpy()
    sources = np.array([source_from_name(Path(p).name) for p in table["path"]])
    subtypes = table["subtype"].to_numpy().astype(str)
    print(f"{machine()}\nsite sample {args.site}: {len(y)} images, {int(y.sum())} pneumonia")

    cache = args.json.parent / "site_scores"
    scores = {str(path): raw_scores(path, pixels, cache) for path in args.networks}
    rows = [describe(name, y, p, patients, sources, subtypes) for name, p in scores.items()]
    if args.adabn:
        for path in args.networks:
            adapted = adabn_cross_fitted(path, pixels, patients)
            rows.append(describe(
                f"{path} + AdaBN (cross-fitted)", y, adapted, patients, sources, subtypes
            ))
    if args.ensemble and len(scores) > 1:
        mean = np.mean(list(scores.values()), axis=0)
        rows.append(describe("mean of " + ", ".join(scores), y, mean, patients, sources, subtypes))
    for row in rows:
        _print(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
