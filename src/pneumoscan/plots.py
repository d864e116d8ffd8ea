"""Matplotlib figures written by the CLI (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pneumoscan.constants import CLASSES


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
    sns.heatmap(
        matrix, annot=True, fmt="g", cmap="Blues", xticklabels=labels, yticklabels=labels, ax=ax
    )
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


def plot_class_balance(
    counts: pd.DataFrame, path: str | Path, title: str = "Images per class and split"
) -> Path:
    """The notebook's class-balance bar chart: one bar group per split, one bar per class.

    Args:
        counts: Image counts with one row per split and one column per class.
        path: Where to write the PNG.
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(1.6 + 1.6 * max(1, len(counts)), 4))
    counts.plot.bar(ax=ax, rot=0, width=0.75, color=["#4C72B0", "#DD8452", "#55A868"])
    for container in ax.containers:
        ax.bar_label(container, fmt="%d", fontsize=8)  # type: ignore[arg-type]
    ax.set_xlabel("Split")
    ax.set_ylabel("Images")
    ax.set_title(title)
    ax.legend(title="Class")
    ax.margins(y=0.12)  # room for the count labels above the tallest bar
    return _save(fig, path)


def plot_sample_grid(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    path: str | Path,
    shape: tuple[int, int] = (2, 5),
    title: str = "",
) -> Path:
    """The notebook's ``plot_img``: a grid of images, each titled with its label.

    Args:
        images: Images as ``(height, width)`` or ``(height, width, 3)`` uint8 arrays.
        titles: One title per image (its label).
        path: Where to write the PNG.
        shape: Grid ``(rows, columns)``; cells beyond the images stay empty.
        title: Figure title.
    """
    rows, cols = shape
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            # Fixed 0-255 range: per-image contrast stretching would hide exposure differences.
            ax.imshow(images[index], cmap="gray", vmin=0, vmax=255)
            ax.set_title(titles[index])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
