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
from pneumoscan.formatting import format_threshold
from pneumoscan.metrics import operating_rates


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
    import seaborn as sns  # lazy: loads seaborn (the confusion matrix only)

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


def _interval_error(value: float, interval: Sequence[float] | None) -> list[list[float]] | None:
    """Matplotlib's asymmetric error bar ``[[below], [above]]`` for ``value`` in ``interval``."""
    if interval is None or any(v is None or np.isnan(v) for v in (value, *interval)):
        return None
    low, high = interval
    return [[max(0.0, value - low)], [max(0.0, high - value)]]


def _ci_text(interval: Sequence[float] | None) -> str:
    if interval is None or any(v is None or np.isnan(v) for v in interval):
        return ""
    return f" (95% CI {interval[0]:.3f}–{interval[1]:.3f})"


def _roc_panel(
    ax: plt.Axes,
    y_true: np.ndarray,
    score: np.ndarray,
    threshold: float,
    intervals: dict[str, Sequence[float]],
    positive: str,
    negative: str,
) -> dict[str, float] | None:
    """One ROC curve on ``ax``, the operating point marked with its 95% intervals and the AUC
    with its interval in the legend; the main report's and the subtype estimate's.

    Returns:
        The operating rates (:func:`pneumoscan.metrics.operating_rates`), or ``None`` when
        only one class is present (the panel then says so).
    """
    from sklearn.metrics import roc_auc_score, roc_curve  # lazy: loads scikit-learn

    ax.set_xlabel(f"1 − specificity (false-positive rate, share of {negative} images)")
    ax.set_ylabel(f"Sensitivity (true-positive rate, share of {positive} images)")
    ax.set_title("ROC curve")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if len(np.unique(y_true)) < 2:
        ax.text(0.5, 0.5, "undefined: only one class present", ha="center", va="center")
        return None
    rates = operating_rates(y_true, score, threshold)
    sensitivity, specificity = rates["sensitivity"], rates["specificity"]
    fpr, tpr, _ = roc_curve(y_true, score)
    auc = float(roc_auc_score(y_true, score))
    ax.plot(fpr, tpr, color="#4C72B0", label=f"ROC AUC {auc:.3f}{_ci_text(intervals.get('auc'))}")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    spec_ci = intervals.get("specificity")
    ax.errorbar(
        1 - specificity,
        sensitivity,
        xerr=_interval_error(
            1 - specificity, None if spec_ci is None else [1 - spec_ci[1], 1 - spec_ci[0]]
        ),
        yerr=_interval_error(sensitivity, intervals.get("sensitivity")),
        fmt="o",
        color="#C44E52",
        capsize=4,
        label=f"threshold {format_threshold(threshold)}: sensitivity {sensitivity:.3f}, "
        f"specificity {specificity:.3f}",
    )
    ax.legend(loc="lower right", fontsize=8)
    return rates


def plot_roc_pr(
    y_true: np.ndarray,
    p_pneumonia: np.ndarray,
    threshold: float,
    path: str | Path,
    intervals: dict[str, Sequence[float]] | None = None,
    title: str = "",
) -> Path:
    """ROC and precision-recall curves side by side, the operating point marked with its
    95% intervals (sensitivity, 1 - specificity, PPV) and the AUCs with theirs in the legend.

    Args:
        y_true: 0/1 labels (PNEUMONIA is 1).
        p_pneumonia: Scores.
        threshold: Operating threshold, marked on both curves.
        path: Where to write the PNG.
        intervals: Optional ``[low, high]`` per metric: ``auc``, ``pr_auc``, ``sensitivity``,
            ``specificity``, ``ppv``.
        title: Figure title.
    """
    from sklearn.metrics import (  # lazy: loads scikit-learn
        average_precision_score,
        precision_recall_curve,
    )

    intervals = intervals or {}
    y_true = np.asarray(y_true).astype(int)
    p_pneumonia = np.asarray(p_pneumonia, dtype=float)
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4.8))
    rates = _roc_panel(roc_ax, y_true, p_pneumonia, threshold, intervals, CLASSES[1], CLASSES[0])
    pr_ax.set_xlabel("Sensitivity (recall, share of PNEUMONIA images)")
    pr_ax.set_ylabel("PPV (precision, share of flagged images with pneumonia)")
    pr_ax.set_title("Precision-recall curve")
    pr_ax.set_xlim(-0.02, 1.02)
    pr_ax.set_ylim(-0.02, 1.02)
    pr_ax.grid(alpha=0.3)
    if rates is None:
        pr_ax.text(0.5, 0.5, "undefined: only one class present", ha="center", va="center")
        fig.suptitle(title)
        return _save(fig, path)

    sensitivity, ppv = rates["sensitivity"], rates["ppv"]
    precision, recall, _ = precision_recall_curve(y_true, p_pneumonia)
    pr_auc = float(average_precision_score(y_true, p_pneumonia))
    pr_ax.step(
        recall,
        precision,
        where="post",
        color="#4C72B0",
        label=f"PR AUC {pr_auc:.3f}{_ci_text(intervals.get('pr_auc'))}",
    )
    prevalence = float(y_true.mean())
    pr_ax.axhline(prevalence, linestyle=":", color="grey", label=f"prevalence {prevalence:.3f}")
    pr_ax.errorbar(
        sensitivity,
        ppv,
        xerr=_interval_error(sensitivity, intervals.get("sensitivity")),
        yerr=_interval_error(ppv, intervals.get("ppv")),
        fmt="o",
        color="#C44E52",
        capsize=4,
        label=f"threshold {format_threshold(threshold)}: sensitivity {sensitivity:.3f}, "
        f"PPV {ppv:.3f}",
    )
    pr_ax.legend(loc="lower left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_subtype_roc(
    is_bacterial: np.ndarray,
    p_bacterial: np.ndarray,
    threshold: float,
    path: str | Path,
    intervals: dict[str, Sequence[float]] | None = None,
    title: str = "",
) -> Path:
    """ROC curve of the bacterial-or-viral estimate on pneumonias of known cause, bacterial
    as the positive class (the class its threshold is set for), the call marked.

    Args:
        is_bacterial: 1 for bacterial, 0 for viral pneumonia.
        p_bacterial: P(bacterial) = 1 - P(viral).
        threshold: The call's threshold on P(bacterial).
        path: Where to write the PNG.
        intervals: Optional ``[low, high]`` for ``auc``, ``sensitivity`` (bacterial called
            bacterial) and ``specificity`` (viral called viral).
        title: Figure title.
    """
    fig, ax = plt.subplots(figsize=(5.8, 5.2))
    _roc_panel(
        ax,
        np.asarray(is_bacterial).astype(int),
        np.asarray(p_bacterial, dtype=float),
        threshold,
        intervals or {},
        "bacterial",
        "viral",
    )
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(
    bins: pd.DataFrame, path: str | Path, ece: float, brier: float, title: str = ""
) -> Path:
    """Reliability diagram: observed pneumonia rate per probability bin (Wilson 95% bars)
    against the mean predicted P(pneumonia), with the number of images per bin below.

    Args:
        bins: Output of :func:`pneumoscan.metrics.reliability_table`.
        path: Where to write the PNG.
        ece: Expected calibration error, shown in the title.
        brier: Brier score, shown in the title.
        title: Figure title (default: names ECE and Brier).
    """
    fig, (ax, count_ax) = plt.subplots(
        2, 1, figsize=(5.6, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    filled = bins[bins["n"] > 0]
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.errorbar(
        filled["mean_predicted"],
        filled["observed"],
        yerr=[
            (filled["observed"] - filled["ci_low"]).clip(lower=0),
            (filled["ci_high"] - filled["observed"]).clip(lower=0),
        ],
        fmt="o-",
        color="#4C72B0",
        capsize=3,
        label="observed rate (95% Wilson CI)",
    )
    ax.set_ylabel("Observed pneumonia rate (share of images)")
    # A little margin: points of the first and last bins sit near 0 and 1.
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.04, 1.04)
    ax.grid(alpha=0.3)
    # Ten points at most: "best" finds the emptiest corner cheaply, whatever the calibration.
    ax.legend(loc="best", fontsize=8)
    ax.set_title(title or f"Reliability diagram (ECE {ece:.3f}, Brier {brier:.3f}, 10 bins)")
    centres = (bins["bin_low"] + bins["bin_high"]) / 2
    count_ax.bar(centres, bins["n"], width=bins["bin_high"] - bins["bin_low"], color="#8C8C8C")
    count_ax.set_xlabel("Predicted P(pneumonia) (bin mean; bins of width 0.1)")
    count_ax.set_ylabel("Images (count)")
    count_ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def plot_error_gallery(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | Path,
    title: str,
    heatmaps: Sequence[np.ndarray | None] | None = None,
    columns: int = 4,
) -> Path:
    """A gallery of misclassified X-rays, each captioned (file, P(pneumonia), subtype).

    Args:
        images: Grey or RGB uint8 thumbnails.
        captions: One caption per image.
        path: Where to write the PNG.
        title: Figure title.
        heatmaps: Optional per-image saliency maps in [0, 1] (any size; stretched over the
            image) drawn semi-transparently on top.
        columns: Images per row.
    """
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= len(images):
            continue
        image = images[index]
        # Fixed 0-255 range, as in the sample grid: the model saw the exposure as it is.
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        heatmap = heatmaps[index] if heatmaps is not None else None
        if heatmap is not None:
            height, width = image.shape[:2]
            ax.imshow(heatmap, cmap="jet", alpha=0.35, extent=(0, width, height, 0), vmin=0, vmax=1)
        ax.set_title(captions[index], fontsize=8)
    if not images:
        axes.flat[0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
