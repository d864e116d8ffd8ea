"""Matplotlib figures written by the CLI (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pneumoscan.constants import CLASSES  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_confusion_matrix(
    matrix: np.ndarray, path: str | Path, labels: Sequence[str] = CLASSES, title: str = ""
) -> Path:
    """The notebook's confusion-matrix heatmap: true class on y, predicted class on x."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(4.8, 4))
    sns.heatmap(matrix, annot=True, fmt="g", cmap="Blues", xticklabels=labels, yticklabels=labels, ax=ax)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(title or "Confusion matrix (images)")
    return _save(fig, path)


def plot_training_curves(history: pd.DataFrame, path: str | Path) -> Path:
    """Loss, accuracy and validation AUC per epoch from a run's ``history.csv``."""
    panels = [("loss", "Loss (binary cross-entropy)"), ("accuracy", "Accuracy"), ("auc", "ROC AUC")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (metric, label) in zip(axes, panels, strict=True):
        for prefix, style in (("", "-o"), ("val_", "-s")):
            column = prefix + metric
            if column in history and history[column].notna().any():
                ax.plot(history["epoch"], history[column], style, label=column)
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.set_title(label + " per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)
