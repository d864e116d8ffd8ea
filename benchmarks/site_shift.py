"""Measure test-time options against the site shift on ../shared/data/site_sample.

Usage:
    python benchmarks/site_shift.py MODEL [MODEL ...]

For each model prints site-sample AUC, and sensitivity/specificity at the model's stored
(validation-chosen) threshold, for: the plain model; horizontal-flip test-time augmentation;
and batch-norm statistics re-estimated on the site's own (unlabelled) images (AdaBN, Li et al.
2016; only for networks with batch normalisation). The AdaBN figure is optimistic in one way:
the statistics come from the same 100 images that are scored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keras
import numpy as np
from common import SHARED_DATA, machine

from pneumoscan.calibration import apply_temperature
from pneumoscan.constants import CLASSES, POSITIVE_INDEX
from pneumoscan.data import scan_dataset
from pneumoscan.metrics import binary_metrics
from pneumoscan.modelfile import load_model
from pneumoscan.pipeline import decode_all
from pneumoscan.preprocess import to_model_input


def _scores(network: keras.Model, x: np.ndarray, temperature: float) -> np.ndarray:
    raw = np.concatenate(
        [np.asarray(network.predict_on_batch(x[i : i + 32])) for i in range(0, len(x), 32)]
    )[:, POSITIVE_INDEX]
    return apply_temperature(raw, temperature)


def _adapt_batch_norm(network: keras.Model, x: np.ndarray) -> bool:
    norms = [layer for layer in network._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    if not norms:
        return False
    for layer in norms:
        layer.momentum = 0.0
    network(x, training=True)
    return True


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
            "plain": _scores(model.network, x, model.temperature),
            "hflip TTA": (
                _scores(model.network, x, model.temperature)
                + _scores(model.network, x[:, :, ::-1], model.temperature)
            )
            / 2,
        }
        if _adapt_batch_norm(model.network, x):
            variants["AdaBN on site images"] = _scores(model.network, x, model.temperature)
        for name, p in variants.items():
            m = binary_metrics(y, p, model.threshold)
            print(
                f"{path}: {name:22s} AUC {m['auc']:.4f}  at stored threshold {model.threshold:.4f}: "
                f"sens {m['sensitivity']:.3f} spec {m['specificity']:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
