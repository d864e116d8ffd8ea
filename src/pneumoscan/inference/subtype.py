"""Fitting the subtype head's operating point: Platt scaling of P(bacterial), then the highest
threshold whose bacterial sensitivity reaches the target.

One fit behind training's (validation split), the int8 export's (refitted on the int8
features) and ``calibrate --subtype``'s (a site's sample, with a confidence chosen by the split
check). It is :func:`pneumoscan.inference.calibration.fit_operating_point` with bacterial
pneumonia as the positive class: calling a bacterial pneumonia viral is the costly
error, so its sensitivity is what the threshold guarantees.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pneumoscan.inference.calibration import fit_operating_point
from pneumoscan.models.modelfile import OperatingPoint
from pneumoscan.models.subtype import SubtypeHead


def fit_subtype_point(
    head: SubtypeHead,
    is_bacterial: np.ndarray,
    raw_bacterial: np.ndarray,
    target: float,
    split: str,
    fitted_on: str,
    threshold_rule: str,
    confidence: float | None = None,
) -> SubtypeHead:
    """``head`` with its calibration and threshold fitted on labelled pneumonias.

    Args:
        head: The head (its weights are kept).
        is_bacterial: 1 for bacterial, 0 for viral pneumonia.
        raw_bacterial: The head's uncalibrated P(bacterial) on the same images.
        target: Bacterial sensitivity the threshold must reach.
        split: Description of the images, stored with the figures.
        fitted_on: :data:`pneumoscan.models.modelfile.VALIDATION_SPLIT` or ``SITE_SAMPLE``.
        threshold_rule: The rule in words.
        confidence: One-sided confidence of the sensitivity bound (``None``: the plain rate).

    Raises:
        ValueError: Bacterial or viral pneumonias are missing.
    """
    y = np.asarray(is_bacterial).astype(int)
    if len(np.unique(y)) < 2:
        raise ValueError("fitting the subtype threshold needs bacterial and viral pneumonias")
    fitted = fit_operating_point(
        y,
        raw_bacterial,
        target,
        split=split,
        fitted_on=split,
        threshold_rule=threshold_rule,
        confidence=confidence,
        point_fitted_on=fitted_on,
        method="Platt scaling of the logit of P(bacterial)",
    )
    return dataclasses.replace(
        head,
        point=OperatingPoint.from_metadata(fitted),
        calibration=fitted["calibration"],
        validation_metrics=fitted["validation_metrics"],
    )
