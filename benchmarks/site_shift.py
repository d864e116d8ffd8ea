"""Measure test-time options against the site shift on ../shared/data/site_sample.

Usage:
    python benchmarks/site_shift.py MODEL [MODEL ...]

For each model prints site-sample AUC, and sensitivity/specificity at the model's stored
(validation-chosen) threshold, for: the plain model; horizontal-flip test-time augmentation;
and batch-norm statistics re-estimated on the site's own (unlabelled) images
(``pneumoscan.train.adapt``; only for networks with batch normalisation). The AdaBN figure is
optimistic in one way: the statistics come from the same 100 images that are scored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from common import SHARED_DATA, machine

from pneumoscan.constants import CLASSES, POSITIVE_INDEX
from pneumoscan.data.dataset import scan_dataset
from pneumoscan.data.pipeline import decode_all
from pneumoscan.data.preprocess import to_model_input
from pneumoscan.inference.calibration import apply_temperature
from pneumoscan.metrics import binary_metrics
from pneumoscan.models.modelfile import LoadedModel, load_model
from pneumoscan.train.adapt import adapt_batch_norm, batch_norm_layers


def _scores(model: LoadedModel, x: np.ndarray) -> np.ndarray:
    raw = np.concatenate(
        [np.asarray(model.network.predict_on_batch(x[i : i + 32])) for i in range(0, len(x), 32)]
    )[:, POSITIVE_INDEX]
    return apply_temperature(raw, model.temperature, model.logit_bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    table = scan_dataset(SHARED_DATA / "site_sample")
    y = (table["label"] == CLASSES[1]).to_numpy().astype(int)
    for path in args.models:
        model = load_model(path)
        pixels, _, _ = decode_all(table["path"].tolist(), model.preprocess)
        x = to_model_input(pixels)
        variants = {
            "plain": _scores(model, x),
            "hflip TTA": (_scores(model, x) + _scores(model, x[:, :, ::-1])) / 2,
        }
        if batch_norm_layers(model.network):
            adapt_batch_norm(model.network, [x[i : i + 32] for i in range(0, len(x), 32)])
            variants["AdaBN on site images"] = _scores(model, x)
        for name, p in variants.items():
            m = binary_metrics(y, p, model.threshold)
            print(
                f"{path}: {name:22s} AUC {m['auc']:.4f}  at the stored threshold "
                f"{model.threshold:.4f}: sens {m['sensitivity']:.3f} spec {m['specificity']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
