"""Accuracy against input resolution: the measurement behind ``MIN_IMAGE_SIDE`` (issue 22).

Usage:
    .venv/bin/python benchmarks/min_resolution.py [--sides 8 16 32 64 128 224] [--model PATH]

Every image of ``../shared/data/site_sample`` (224x224) is shrunk to ``side x side`` (area
averaging, as a thumbnail is made) and enlarged back to 224x224 (bilinear, as the decoder
would), then scored by the shipped model. Prints AUC, sensitivity and specificity at the
stored threshold, and the mean probability of the NORMAL images, per side.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import SHARED_DATA, machine
from PIL import Image
from sklearn.metrics import roc_auc_score

import pneumoscan


def _degraded(path: Path, side: int) -> np.ndarray:
    with Image.open(path) as image:
        grey = image.convert("L")
    small = grey.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small.resize(grey.size, Image.Resampling.BILINEAR).convert("RGB"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[8, 16, 32, 64, 96, 128, 224])
    parser.add_argument("--model", default=None, help="Model file (default: the shipped one).")
    args = parser.parse_args()
    print(machine())
    model = pneumoscan.load(args.model)
    root = SHARED_DATA / "site_sample"
    paths = sorted(root.glob("*/*.jpeg"))
    labels = np.array([p.parent.name == "PNEUMONIA" for p in paths])
    print(f"{len(paths)} images ({labels.sum()} PNEUMONIA), model {model.name}, "
          f"threshold {model.threshold:.3f}")  # fmt: skip
    print(f"{'side':>5s} {'AUC':>6s} {'sens':>6s} {'spec':>6s} {'p(NORMAL imgs)':>15s}")
    for side in args.sides:
        images = [_degraded(p, side) for p in paths]
        proba = model.predict_proba(images)[:, model.classes.index("PNEUMONIA")]
        flagged = proba >= model.threshold
        auc = roc_auc_score(labels, proba)
        sensitivity = flagged[labels].mean()
        specificity = (~flagged[~labels]).mean()
        print(f"{side:5d} {auc:6.3f} {sensitivity:6.3f} {specificity:6.3f} "
              f"{proba[~labels].mean():15.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
