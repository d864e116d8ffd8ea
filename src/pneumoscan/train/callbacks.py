"""Training callbacks: per-epoch validation scoring, history and resumable checkpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

from pneumoscan.constants import DEFAULT_THRESHOLD, POSITIVE_INDEX
from pneumoscan.inference.scorer import keras_probabilities
from pneumoscan.jsonio import atomic_write, write_json
from pneumoscan.metrics import binary_metrics
from pneumoscan.models.subtype import subtype_targets
from pneumoscan.progress import Reporter

_HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "val_auc", "seconds"]


def predict_outputs(
    network: keras.Model, pixels: np.ndarray, batch_size: int = 64
) -> list[np.ndarray]:
    """Every output of ``network`` for uint8 images held in memory, in batches."""
    batches = []
    for i in range(0, len(pixels), batch_size):
        outputs = keras_probabilities(network, pixels[i : i + batch_size])
        batches.append(outputs if isinstance(outputs, list) else [outputs])
    if not batches:
        return [np.zeros((0, int(out.shape[-1]))) for out in network.outputs]
    return [np.concatenate(parts) for parts in zip(*batches, strict=True)]


def predict_pixels(network: keras.Model, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(pneumonia) (the first output) for uint8 images held in memory, in batches."""
    return predict_outputs(network, pixels, batch_size)[0][:, POSITIVE_INDEX]


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
        val_subtypes: File-name subtypes of the validation images, for a network with a
            subtype head: its AUC (viral against bacterial) joins the history.
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
        val_subtypes: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.val_subtypes = val_subtypes
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
        outputs = predict_outputs(self.model, self.val_x)
        p_val = outputs[0][:, POSITIVE_INDEX]
        scores = binary_metrics(self.val_y, p_val, DEFAULT_THRESHOLD)
        subtype = ""
        row = {
            "epoch": epoch + 1,
            "loss": logs.get("loss"),
            # A two-output network names its metrics after the output.
            "accuracy": next((v for k, v in logs.items() if k.endswith("accuracy")), None),
            "val_loss": log_loss(self.val_y, np.clip(p_val, 1e-7, 1 - 1e-7), labels=[0, 1]),
            "val_accuracy": scores["accuracy"],
            "val_auc": scores["auc"],
            "seconds": round(time.perf_counter() - self.epoch_started, 1),
        }
        if self.val_subtypes is not None and len(outputs) > 1:
            viral, known = subtype_targets(self.val_subtypes)
            row["val_subtype_auc"] = roc_auc_score(viral[known], outputs[1][known, 0])
            subtype = f"  val_subtype_auc {row['val_subtype_auc']:.4f}"
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
            f"val_spec {scores['specificity']:.3f}{subtype}  ({row['seconds']} s)"
        )

    def _append_history(self, row: dict[str, Any]) -> None:
        path: Path = self.run.history
        history = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=_HISTORY_COLUMNS)
        # A resumed run may repeat an epoch that was interrupted after its history row.
        history = history[history["epoch"] < row["epoch"]]
        history = pd.concat([history, pd.DataFrame([row])], ignore_index=True)
        history.to_csv(path, index=False)
