"""Compare subtype designs on the site sample (issue 21): the pneumonia decision and the
bacterial-or-viral estimate, each figure with its interval.

Usage:
    python benchmarks/subtype_heads.py NETWORK [NETWORK ...] [--data FOLDER]

NETWORK is a training checkpoint or a model file: a two-output network (P(pneumonia) softmax,
P(viral) second head: ``train --subtype-weight``), a 3-class softmax (NORMAL / bacterial /
viral: ``benchmarks/subtype_three_class.py``; P(pneumonia) = 1 - P(normal), P(viral) =
P(viral) / (P(bacterial) + P(viral))), or a plain two-class network (pneumonia figures only).
A model file whose subtype head travels as numbers (the shipped form) is scored through
``pneumoscan.inference.scorer.Scorer``.

Printed per network, on ``../shared/data/site_sample`` (raw scores; AUC intervals: 2,000
patient bootstrap resamples):

* pneumonia-versus-normal AUC, viral-versus-normal AUC;
* bacterial-versus-viral AUC on the named pneumonias;
* the best viral specificity at 90% bacterial sensitivity, read off the ROC curve
  (threshold-free and optimistic: for comparing networks, not a promise).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import SHARED_DATA, machine

from pneumoscan.data.dataset import scan_dataset
from pneumoscan.data.pipeline import decode_all
from pneumoscan.metrics import (
    bootstrap_replicates,
    percentile_interval,
    safe_roc_auc,
    specificity_at_sensitivity,
    weighted_roc_auc,
)


def outputs(path: Path, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw ``(P(pneumonia), P(viral) or None)`` of a network on uint8 ``pixels``."""
    import keras

    import pneumoscan.models  # noqa: F401  (registers the custom layers)
    from pneumoscan.data.augment import unwrap
    from pneumoscan.models.modelfile import read_metadata
    from pneumoscan.train.callbacks import predict_outputs

    if "subtype" in _metadata(path, read_metadata):
        from pneumoscan.inference.scorer import Scorer
        from pneumoscan.models.modelfile import load_model

        scorer = Scorer(load_model(path))
        forward = scorer.forward(pixels)
        assert scorer.subtype is not None and forward.features is not None
        return forward.p_raw, 1.0 - scorer.subtype.raw_bacterial(forward.features)
    network = unwrap(keras.saving.load_model(path, compile=False))
    found = predict_outputs(network, pixels)
    if len(found) == 2:
        return found[0][:, 1], found[1][:, 0]
    if found[0].shape[1] == 3:
        p = found[0]
        return 1.0 - p[:, 0], p[:, 2] / np.clip(p[:, 1] + p[:, 2], 1e-12, None)
    return found[0][:, 1], None


def _metadata(path: Path, reader) -> dict:
    try:
        return reader(path)
    except Exception:
        return {}


def auc_ci(y: np.ndarray, score: np.ndarray, groups: np.ndarray) -> str:
    replicates = bootstrap_replicates(y, [score], [weighted_roc_auc], groups, 2000, 0)[0, 0]
    low, high = percentile_interval(replicates)
    return f"{safe_roc_auc(y, score):.3f} ({low:.3f}-{high:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("networks", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "site_sample")
    args = parser.parse_args()
    from pneumoscan.models import get_spec

    print(machine())
    table = scan_dataset(args.data, read_headers=False)
    pixels, kept, _ = decode_all(table["path"].tolist(), get_spec("efficientnet_lite0").preprocess)
    table = table.iloc[kept].reset_index(drop=True)
    y = (table["label"] == "PNEUMONIA").to_numpy().astype(int)
    subtype = table["subtype"].to_numpy()
    patients = table["patient_id"].to_numpy()
    named = np.isin(subtype, ["bacteria", "virus"])
    not_bacterial = subtype != "bacteria"
    print(
        f"{args.data}: {len(y)} images, {named.sum()} named pneumonias "
        f"({(subtype == 'bacteria').sum()} bacterial, {(subtype == 'virus').sum()} viral)"
    )
    for path in args.networks:
        p, viral = outputs(path, pixels)
        line = (
            f"{path}: pneumonia AUC {auc_ci(y, p, patients)}, viral-vs-normal "
            f"{auc_ci(y[not_bacterial], p[not_bacterial], patients[not_bacterial])}"
        )
        if viral is not None:
            is_viral = (subtype[named] == "virus").astype(int)
            bacterial = 1.0 - viral[named]
            spec = specificity_at_sensitivity(1 - is_viral, bacterial, 0.90)
            line += (
                f"; bacterial-vs-viral AUC {auc_ci(is_viral, viral[named], patients[named])}, "
                f"best viral specificity at 90% bacterial sensitivity {spec:.3f}"
            )
        print(line, flush=True)


if __name__ == "__main__":
    main()
