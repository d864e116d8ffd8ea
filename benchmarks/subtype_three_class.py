"""Train the 3-class alternative to the subtype head (NORMAL / bacterial / viral softmax), for
the comparison issue 21 asks for; the shipped design is the second head (``train
--subtype-weight``).

Usage:
    python benchmarks/subtype_three_class.py OUT [--epochs 8]

Everything but the output layer is the shipped recipe (Lite0, ImageNet weights, frozen batch
norm, ``xray_border``, Adam 2e-4 cosine, batch 32, seed 42, the same patient-grouped split),
with the three classes weighted inversely to their counts. Every epoch's network is saved as
``OUT/epoch-N.keras``; P(pneumonia) = 1 - P(normal), P(viral) = P(viral) / (P(bacterial) +
P(viral)). Score them with ``benchmarks/subtype_heads.py``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import SHARED_DATA, machine

from pneumoscan.data.cache import cached_decode
from pneumoscan.data.dataset import assign_validation_split, scan_dataset
from pneumoscan.data.pipeline import steps_per_epoch, training_batches
from pneumoscan.models import create_model, get_spec
from pneumoscan.train.loop import _build_optimizer, freeze_batch_norm

CAUSES = {"normal": 0, "bacteria": 1, "virus": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    import keras
    import tensorflow as tf

    from pneumoscan.data.augment import build_augmenter, wrap_for_training

    print(machine())
    recipe = replace(get_spec("efficientnet_lite0").recipe, epochs=args.epochs)
    keras.utils.set_random_seed(args.seed)
    table = assign_validation_split(scan_dataset(SHARED_DATA / "chest_xray", read_headers=False))
    table = table[table["subtype"].isin(list(CAUSES)) & (table["split"] == "train")]
    table = table.reset_index(drop=True)
    preprocess = get_spec("efficientnet_lite0").preprocess
    pixels, kept, _ = cached_decode(table["path"].tolist(), preprocess)
    labels = table["subtype"].map(CAUSES).to_numpy()[kept]
    counts = np.bincount(labels, minlength=3)
    class_weight = {k: float(len(labels) / (3 * counts[k])) for k in range(3)}
    print(f"{len(labels)} training images, per class {counts.tolist()}, weights {class_weight}")

    network = create_model("efficientnet_lite0", num_classes=3)
    freeze_batch_norm(network)
    model = wrap_for_training(network, build_augmenter(recipe.augment, args.seed))
    steps = steps_per_epoch(len(labels), recipe.batch_size)
    model.compile(_build_optimizer(recipe, recipe.epochs * steps), loss="categorical_crossentropy")
    size = pixels.shape[1:3]
    dataset = tf.data.Dataset.from_generator(
        lambda: training_batches(
            pixels, labels, recipe.batch_size, args.seed, 0, recipe.epochs, num_classes=3
        ),
        output_signature=(
            tf.TensorSpec((None, *size, 3), tf.float32),
            tf.TensorSpec((None, 3), tf.float32),
        ),
    ).prefetch(tf.data.AUTOTUNE)
    args.out.mkdir(parents=True, exist_ok=True)

    class Save(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            network.save(args.out / f"epoch-{epoch + 1}.keras")
            loss = (logs or {}).get("loss")
            print(f"epoch {epoch + 1}: loss {loss:.4f} ({time.ctime()})", flush=True)

    model.fit(
        dataset, epochs=recipe.epochs, steps_per_epoch=steps, class_weight=class_weight,
        callbacks=[Save()], verbose=0,
    )  # fmt: skip


if __name__ == "__main__":
    main()
