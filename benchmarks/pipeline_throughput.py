"""Training input pipelines: the notebook's Python generator against the cache + tf.data.

Usage (full size; run on a quiet machine, about 8 minutes on 2 cores):
    .venv/bin/python benchmarks/pipeline_throughput.py --n 2000 --epochs 3

Quick check that it runs (a minute or two):
    .venv/bin/python benchmarks/pipeline_throughput.py --n 50 --epochs 2 --idle-steps 5

Two inputs: full-resolution X-rays (``originals`` repeated, via symlinks with distinct names,
to ``--n`` files, both classes) and the 224x224 shared training copies (the first ``--n``,
both classes). For each, the ``seed`` architecture (batch 16, rmsprop) is fitted with

* ``notebook``: the notebook's ``train_data_gen``, its code kept: ``cv2.imread``,
  ``cv2.resize`` to 224x224, BGR to RGB, /255, per image per epoch, reshuffled every batch,
  15 fresh images per batch of 16 (the notebook's ``count == batch_size - 1`` break leaves the
  last slot stale), fed to ``model.fit`` as a Python generator (Keras wraps it in ``tf.data``
  with prefetch). Needs ``pip install -e .[bench]`` (OpenCV);
* ``cache``: :func:`pneumoscan.data.cache.cached_decode` (built before timing; its one-off cost is
  printed) feeding :func:`pneumoscan.data.pipeline.make_tf_dataset`, as ``pneumoscan train`` does,
  fitted twice: in float32 like the notebook (the input pipeline's effect alone), and in the
  ``seed`` recipe's precision (``mixed_bfloat16``: what ``pneumoscan train --arch seed`` runs).

Printed: images/s over epochs 2+ of ``model.fit`` for each, the ratios (goals: >= 3x on full
resolution, >= 1.0x on the 224 copies), and the input-pipeline idle share: over
``--idle-steps`` steps after a warm-up epoch, time spent in ``next()`` on the batch iterator
divided by ``next()`` + ``train_on_batch`` time (goal: < 5% for the cache, recipe precision).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from common import SHARED_DATA, machine

from pneumoscan.constants import CLASSES
from pneumoscan.data.cache import cached_decode
from pneumoscan.data.pipeline import make_tf_dataset, steps_per_epoch
from pneumoscan.data.preprocess import PreprocessConfig
from pneumoscan.models import create_model, get_spec
from pneumoscan.train.loop import dtype_policy

BATCH = 16
PRECISION = get_spec("seed").recipe.precision


def full_resolution_folder(n: int, folder: Path) -> list[tuple[str, int]]:
    """``n`` symlinks to the originals with distinct names, alternating the classes."""
    sources = {
        label: sorted((SHARED_DATA / "originals" / label).glob("*.jpeg")) for label in CLASSES
    }
    files = []
    for i in range(n):
        label = CLASSES[i % 2]
        source = sources[label][(i // 2) % len(sources[label])]
        target = folder / label / f"copy{i:05d}_{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source, target)
        files.append((str(target), CLASSES.index(label)))
    return files


def shared_224(n: int) -> list[tuple[str, int]]:
    """The first ``n`` shared 224x224 training copies, half of each class."""
    train = SHARED_DATA / "chest_xray" / "train"
    files = []
    for k, label in enumerate(CLASSES):
        count = n // 2 + (n % 2 if k == 0 else 0)
        files += [(str(p), k) for p in sorted((train / label).glob("*.jpeg"))[:count]]
    return files


def notebook_generator(files: list[tuple[str, int]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The notebook's ``train_data_gen`` (``../shared/SEED.md``, cell 19), its code kept."""
    import cv2

    steps = len(files) // BATCH
    batch_data = np.zeros((BATCH, 224, 224, 3), dtype=np.float32)
    batch_labels = np.zeros((BATCH, 2), dtype=np.float32)
    indices = np.arange(len(files))
    i = 0
    while True:
        np.random.shuffle(indices)
        # The notebook stops at ``count == batch_size - 1``: 15 fresh images, the last stale.
        for count, idx in enumerate(indices[i * BATCH : (i + 1) * BATCH - 1]):
            path, label = files[idx]
            img = cv2.resize(cv2.imread(path), (224, 224))
            if img.shape[2] == 1:
                img = np.dstack([img, img, img])
            batch_data[count] = cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
            batch_labels[count] = np.eye(2, dtype=np.float32)[label]
        i += 1
        yield batch_data, batch_labels
        if i >= steps:
            i = 0


def _model() -> Any:
    # Built under the caller's dtype policy (see ``dtype_policy``).
    model = create_model("seed")
    model.compile(optimizer="rmsprop", loss="binary_crossentropy")
    return model


class _EpochTimer:
    """Wall time per epoch (Keras callback built lazily to keep imports in main)."""

    def __init__(self) -> None:
        import keras

        class Timer(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.times: list[float] = []
                self.start = 0.0

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.start = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                self.times.append(time.perf_counter() - self.start)

        self.callback = Timer()


def fit_rate(
    source: Any, steps: int, images: int, epochs: int, precision: str = "float32"
) -> float:
    """Images/s over epochs 2+ of ``model.fit`` on ``source`` (``images`` per epoch)."""
    timer = _EpochTimer()
    with dtype_policy(precision):
        model = _model()
    model.fit(source, epochs=epochs, steps_per_epoch=steps, callbacks=[timer.callback], verbose=0)
    later = timer.callback.times[1:]
    return images * len(later) / sum(later)


def idle_share(
    batches: Iterator[Any], steps: int, warmup: int, precision: str = "float32"
) -> float:
    """Share of step time spent waiting for the next batch (after ``warmup`` steps)."""
    with dtype_policy(precision):
        model = _model()
    waited = trained = 0.0
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        t1 = time.perf_counter()
        model.train_on_batch(x, y)
        t2 = time.perf_counter()
        if step >= warmup:
            waited, trained = waited + t1 - t0, trained + t2 - t1
    return waited / (waited + trained)


def run(name: str, files: list[tuple[str, int]], args: argparse.Namespace, cache: Path) -> None:
    """Measure both pipelines on one set of files and print the figures."""
    paths = [p for p, _ in files]
    labels = np.array([k for _, k in files])
    started = time.perf_counter()
    pixels, kept, errors = cached_decode(paths, PreprocessConfig(), cache)
    build = time.perf_counter() - started
    assert not errors, errors[:3]
    labels = labels[kept]
    # The generator gives whole batches only; the dataset also the last, short one.
    steps = len(files) // BATCH
    ours_steps = steps_per_epoch(len(labels), BATCH)

    def ours(epochs: int) -> Any:
        return make_tf_dataset(pixels, labels, BATCH, 0, 0, epochs)

    notebook = fit_rate(notebook_generator(files), steps, steps * BATCH, args.epochs)
    cached = fit_rate(ours(args.epochs), ours_steps, len(labels), args.epochs)
    recipe = fit_rate(ours(args.epochs), ours_steps, len(labels), args.epochs, PRECISION)
    # Warm-up: one epoch's steps, so tracing and the first (cold) reads are excluded.
    idle_notebook = idle_share(notebook_generator(files), args.idle_steps, steps)
    epochs_needed = 2 + (args.idle_steps // ours_steps)
    idle_cache = idle_share(iter(ours(epochs_needed)), args.idle_steps, ours_steps, PRECISION)
    print(
        f"{name}: {len(files)} files; cache built in {build:.1f} s (one-off, not in the rates)\n"
        f"  epochs 2-{args.epochs}: notebook generator {notebook:7.1f} images/s, "
        f"cache + tf.data {cached:7.1f} images/s (float32), ratio {cached / notebook:.2f}x; "
        f"with the recipe's {PRECISION} {recipe:7.1f} images/s, ratio {recipe / notebook:.2f}x\n"
        f"  input idle share over {args.idle_steps} steps: notebook {idle_notebook:.1%}, "
        f"cache + tf.data ({PRECISION}) {idle_cache:.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images per input set")
    parser.add_argument("--epochs", type=int, default=3, help="fit epochs (>= 2; 2+ are timed)")
    parser.add_argument("--idle-steps", type=int, default=100)
    parser.add_argument("--only", choices=["full", "224"], help="measure one input set")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (epoch 1 is warm-up)")
    print(f"{machine()}; load average {os.getloadavg()[0]:.1f}; seed architecture, batch {BATCH}")
    with tempfile.TemporaryDirectory(prefix="pneumoscan-bench-") as tmp:
        root = Path(tmp)
        if args.only in (None, "full"):
            files = full_resolution_folder(args.n, root / "full")
            run("full resolution (originals repeated)", files, args, root / "cache")
        if args.only in (None, "224"):
            run("224x224 shared copies", shared_224(args.n), args, root / "cache")


if __name__ == "__main__":
    main()
