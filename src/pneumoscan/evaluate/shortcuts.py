"""Shortcut audit: how far P(pneumonia) moves when things that are not disease change.

A model that reads the laterality marker, burned-in text, the border or the exposure instead
of the lungs will move its score when those are altered, on NORMAL and PNEUMONIA images
alike. Each perturbation here changes one such thing on every image of a labelled folder;
the audit reports the mean shift of the calibrated P(pneumonia) with a patient-bootstrap
interval, and the share of images whose decision flips at the model's threshold (Wilson
interval). A large shift is evidence of a shortcut; a small one is not proof of its absence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pneumoscan.constants import CLASSES, DEFAULT_SEED
from pneumoscan.data.dataset import empty_classes, scan_dataset
from pneumoscan.data.pipeline import decode_all
from pneumoscan.errors import DatasetError
from pneumoscan.inference.predictor import Predictor
from pneumoscan.inference.scorer import p_pneumonia
from pneumoscan.metrics import (
    DEFAULT_RESAMPLES,
    bootstrap_weight_blocks,
    percentile_interval,
    wilson_interval,
)
from pneumoscan.progress import Reporter

Perturbation = Callable[[np.ndarray], np.ndarray]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _draw_text(image: np.ndarray, text: str, corner: str, size: int) -> np.ndarray:
    """White burned-in text in a corner, as scanners print markers and exposure data."""
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    height, width = image.shape[:2]
    margin = max(2, width // 40)
    x = margin if corner.endswith("left") else width - (right - left) - margin
    y = margin if corner.startswith("top") else height - (bottom - top) - margin
    draw.text((x - left, y - top), text, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def _mask_border(image: np.ndarray, share: float = 0.08) -> np.ndarray:
    out = image.copy()
    height, width = image.shape[:2]
    dy, dx = max(1, round(share * height)), max(1, round(share * width))
    out[:dy], out[-dy:], out[:, :dx], out[:, -dx:] = 0, 0, 0, 0
    return out


def _gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    table = np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.uint8)
    return table[image]


def _contrast(image: np.ndarray, factor: float) -> np.ndarray:
    mean = image.mean()
    return np.clip((image.astype(np.float32) - mean) * factor + mean, 0, 255).astype(np.uint8)


#: Name -> (what it does, the perturbation of one uint8 H x W x 3 image).
PERTURBATIONS: dict[str, tuple[str, Perturbation]] = {
    "marker_R_top_left": (
        'laterality marker "R" pasted top left',
        lambda im: _draw_text(im, "R", "top-left", im.shape[0] // 9),
    ),
    "marker_L_top_right": (
        'laterality marker "L" pasted top right',
        lambda im: _draw_text(im, "L", "top-right", im.shape[0] // 9),
    ),
    "text_top_right": (
        "exposure text pasted top right",
        lambda im: _draw_text(im, "85 kV 2.5 mAs", "top-right", im.shape[0] // 22),
    ),
    "border_masked": ("outer 8% of each side set to black", _mask_border),
    "gamma_0.7": ("exposure curve: gamma 0.7 (brighter)", lambda im: _gamma(im, 0.7)),
    "gamma_1.4": ("exposure curve: gamma 1.4 (darker)", lambda im: _gamma(im, 1.4)),
    "contrast_0.7": ("contrast reduced to 70%", lambda im: _contrast(im, 0.7)),
    "flip_horizontal": ("mirrored left-right", lambda im: im[:, ::-1].copy()),
}


@dataclass(frozen=True)
class ShortcutFinding:
    """One perturbation's effect on one labelled folder."""

    name: str
    description: str
    mean_shift: float
    mean_shift_ci: tuple[float, float]
    mean_abs_shift: float
    flipped: int
    flip_rate: float
    flip_rate_ci: tuple[float, float]
    mean_shift_normal: float
    mean_shift_pneumonia: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return self.__dict__.copy()


def shift_statistics(
    name: str,
    description: str,
    y_true: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
    threshold: float,
    patients: np.ndarray,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> ShortcutFinding:
    """Mean shift ``after - before`` with a patient-bootstrap 95% interval, and decision flips.

    Pure in its inputs (the scores), so it is tested without a network.
    """
    shift = np.asarray(after, float) - np.asarray(before, float)
    # The same patient resamples as every other interval of the project: an image's weight is
    # how often its patient was drawn.
    replicates = np.concatenate(
        [
            weights @ shift / weights.sum(axis=1)
            for weights in bootstrap_weight_blocks(patients, len(shift), n_resamples, seed)
        ]
    )
    flipped = int(np.sum((before >= threshold) != (after >= threshold)))
    y_true = np.asarray(y_true).astype(int)
    return ShortcutFinding(
        name=name,
        description=description,
        mean_shift=float(shift.mean()),
        mean_shift_ci=percentile_interval(replicates),
        mean_abs_shift=float(np.abs(shift).mean()),
        flipped=flipped,
        flip_rate=flipped / len(shift),
        flip_rate_ci=wilson_interval(flipped, len(shift)),
        mean_shift_normal=float(shift[y_true == 0].mean()) if (y_true == 0).any() else np.nan,
        mean_shift_pneumonia=float(shift[y_true == 1].mean()) if (y_true == 1).any() else np.nan,
    )


def audit_model(
    data: str | Path,
    model: str | Path | None = None,
    perturbations: list[str] | None = None,
    batch_size: int = 32,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Score a labelled folder plain and under each perturbation.

    Args:
        data: Folder with ``NORMAL/`` and ``PNEUMONIA/`` (or a dataset root: all images).
        model: Model file, run folder or ``.onnx`` export (default: the shipped model),
            opened as ``pneumoscan predict`` opens it (the shipped model's int8 export).
        perturbations: Names from :data:`PERTURBATIONS` (default: all).
        batch_size: Images scored at a time.
        reporter: Progress sink.

    Returns:
        ``model`` (with ``model_sha256``, ``backend``, ``pneumoscan_version``), ``data``,
        ``n``, ``threshold`` and ``findings`` (one dict per perturbation).

    Raises:
        DatasetError: No readable labelled image, or an unknown perturbation name.
    """
    reporter = reporter or Reporter(quiet=True)
    names = perturbations or list(PERTURBATIONS)
    unknown = sorted(set(names) - set(PERTURBATIONS))
    if unknown:
        raise DatasetError(f"unknown perturbation(s) {unknown}; choose from {list(PERTURBATIONS)}")
    predictor = Predictor.open(model)
    loaded = predictor.model
    table = scan_dataset(data)
    table = table[table["error"] == ""].reset_index(drop=True)
    pixels, kept, _ = decode_all(table["path"].tolist(), loaded.preprocess)
    table = table.iloc[kept].reset_index(drop=True)
    if len(table) == 0 or empty_classes(table):
        raise DatasetError(f"{data}: the audit needs readable NORMAL and PNEUMONIA images")
    y_true = (table["label"] == CLASSES[1]).to_numpy().astype(int)
    patients = table["patient_id"].to_numpy()

    def score(images: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                p_pneumonia(loaded, images[i : i + batch_size])
                for i in range(0, len(images), batch_size)
            ]
        )

    findings = []
    with reporter.task("shortcut audit", total=len(names) + 1) as advance:
        before = score(pixels)
        advance(1)
        for name in names:
            description, perturb = PERTURBATIONS[name]
            after = score(np.stack([perturb(image) for image in pixels]))
            finding = shift_statistics(
                name, description, y_true, before, after, loaded.threshold, patients
            )
            findings.append(finding.to_dict())
            advance(1)
    return {
        "model": str(loaded.path),
        "model_sha256": predictor.identity.model_sha256,
        "backend": predictor.backend,
        "pneumoscan_version": predictor.identity.pneumoscan_version,
        "data": str(data),
        "n": len(y_true),
        "n_pneumonia": int(y_true.sum()),
        "threshold": loaded.threshold,
        "findings": findings,
    }
