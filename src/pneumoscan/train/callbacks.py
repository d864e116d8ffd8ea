"""Training callbacks: per-epoch validation scoring, history and resumable checkpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import log_loss

from pneumoscan.constants import DEFAULT_THRESHOLD, POSITIVE_INDEX
from pneumoscan.inference.scorer import keras_probabilities
from pneumoscan.jsonio import atomic_write, write_json
from pneumoscan.metrics import binary_metrics
from pneumoscan.progress import Reporter

_HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_auc", "seconds"]


def predict_pixels(network: keras.Model, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(pneumonia) for uint8 images held in memory, in batches."""
    scores = [
        keras_probabilities(network, pixels[i : i + batch_size])
        for i in range(0, len(pixels), batch_size)
    ]
    return np.concatenate(scores)[:, POSITIVE_INDEX] if scores else np.zeros(0)


def _atomic_save(network: keras.Model, path: Path) -> None:
    with atomic_write(path) as tmp:
        network.save(tmp)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: score validation, append ``history.csv``, save ``last.keras``
    (with optimizer state, for ``--resume``), keep ``best.keras`` by validation AUC (or loss),
    then write ``state.json`` last so a crash mid-save never points at a half-written file.

    Args:
        run: The run folder (``pneumoscan.train.loop._RunFolder``).
        val_x: Validation images, uint8.
        val_y: Validation labels, 0/1.
        reporter: Where to print the epoch summary.
        state: Saved state when resuming.
        select_on: ``val_auc`` (keep the highest) or ``val_loss`` (keep the lowest).
        keep_all: Also keep every epoch as ``epoch-N.keras``.
    """

    def __init__(
        self,
        run: Any,
        val_x: np.ndarray,
        val_y: np.ndarray,
        reporter: Reporter,
        state: dict[str, Any] | None = None,
        select_on: str = "val_auc",
        keep_all: bool = False,
    ) -> None:
        super().__init__()
        self.select_on = select_on
        self.keep_all = keep_all
        self.run = run
        self.val_x = val_x
        self.val_y = val_y
        self.reporter = reporter
        # Stored as "higher is better" so one comparison serves both criteria.
        self.sign = -1.0 if select_on == "val_loss" else 1.0
        saved = (state or {}).get("best_value", (state or {}).get("best_auc"))
        self.best_value = float(saved) if saved is not None else -np.inf * self.sign
        self.best_epoch = int((state or {}).get("best_epoch", 0))
        self.epoch_started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch_started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        p_val = predict_pixels(self.model, self.val_x)
        scores = binary_metrics(self.val_y, p_val, DEFAULT_THRESHOLD)
        row = {
            "epoch": epoch + 1,
            "loss": logs.get("loss"),
            "accuracy": logs.get("accuracy"),
            "val_loss": log_loss(self.val_y, np.clip(p_val, 1e-7, 1 - 1e-7), labels=[0, 1]),
            "val_accuracy": scores["accuracy"],
            "val_auc": scores["auc"],
            "seconds": round(time.perf_counter() - self.epoch_started, 1),
        }
        self._append_history(row)
        self.run.checkpoints.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.model, self.run.last)
        if self.keep_all:
            _atomic_save(self.model, self.run.checkpoints / f"epoch-{epoch + 1}.keras")
        value = float(row[self.select_on])
        if np.isfinite(value) and self.sign * value > self.sign * self.best_value:
            self.best_value, self.best_epoch = value, epoch + 1
            _atomic_save(self.model, self.run.best)
        state = {
            "epochs_completed": epoch + 1,
            "select_on": self.select_on,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
        }
        write_json(self.run.state, state)
        self.reporter.info(
            f"epoch {epoch + 1}: loss {row['loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_auc {row['val_auc']:.4f}  val_sens {scores['sensitivity']:.3f}  "
            f"val_spec {scores['specificity']:.3f}  ({row['seconds']} s)"
        )

    def _append_history(self, row: dict[str, Any]) -> None:
        path: Path = self.run.history
        history = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=_HISTORY_COLUMNS)
        # A resumed run may repeat an epoch that was interrupted after its history row.
        history = history[history["epoch"] < row["epoch"]]
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        history.to_csv(path, index=False)
