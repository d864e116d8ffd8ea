"""Temperature scaling and the sensitivity-first operating threshold.

Both are fitted on labelled data that was not used to fit weights (the validation split at
training time, or a site's own sample with ``pneumoscan calibrate``) and stored in the model.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, logit

from pneumoscan.models.modelfile import VALIDATION_SPLIT, OperatingPoint

_EPS = 1e-7
TEMPERATURE_BOUNDS = (0.05, 20.0)


def probability_to_logit(p_pneumonia: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), with p clipped away from 0 and 1."""
    return np.asarray(logit(np.clip(np.asarray(p_pneumonia, dtype=np.float64), _EPS, 1 - _EPS)))


def apply_temperature(p_pneumonia: np.ndarray, temperature: float, bias: float = 0.0) -> np.ndarray:
    """Map probabilities through ``sigmoid(logit / temperature + bias)`` (ranks unchanged)."""
    if temperature == 1.0 and bias == 0.0:
        return np.asarray(p_pneumonia, dtype=np.float64)
    return np.asarray(expit(probability_to_logit(p_pneumonia) / temperature + bias))


def _negative_log_likelihood(y_true: np.ndarray, logits: np.ndarray, temperature: float) -> float:
    scaled = logits / temperature
    # log(1 + exp(-s)) for positives, log(1 + exp(s)) for negatives, computed stably.
    return float(np.mean(np.logaddexp(0.0, np.where(y_true == 1, -scaled, scaled))))


def fit_temperature(y_true: np.ndarray, p_pneumonia: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of the labels (Guo et al., 2017).

    Args:
        y_true: 0/1 labels; both classes must be present.
        p_pneumonia: Uncalibrated probabilities.

    Raises:
        ValueError: A class is missing (the fit would be meaningless).
    """
    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        raise ValueError("temperature scaling needs both NORMAL and PNEUMONIA images")
    logits = probability_to_logit(p_pneumonia)
    result = minimize_scalar(
        lambda log_t: _negative_log_likelihood(y_true, logits, float(np.exp(log_t))),
        bounds=tuple(np.log(TEMPERATURE_BOUNDS)),
        method="bounded",
    )
    return float(np.exp(result.x))


def fit_temperature_and_bias(y_true: np.ndarray, p_pneumonia: np.ndarray) -> tuple[float, float]:
    """Platt scaling of the logit: the ``(temperature, bias)`` minimising the label NLL.

    A new site often shifts every score the same way (its images all look a little more, or
    less, like pneumonia), which a temperature alone cannot undo; the bias can.

    Raises:
        ValueError: A class is missing.
    """
    from sklearn.linear_model import LogisticRegression  # lazy: loads scikit-learn

    y_true = np.asarray(y_true).astype(int)
    if len(np.unique(y_true)) < 2:
        raise ValueError("Platt scaling needs both NORMAL and PNEUMONIA images")
    logits = probability_to_logit(p_pneumonia).reshape(-1, 1)
    fit = LogisticRegression(C=1e4).fit(logits, y_true)  # nearly unregularised
    slope = float(np.clip(fit.coef_[0, 0], 1 / TEMPERATURE_BOUNDS[1], 1 / TEMPERATURE_BOUNDS[0]))
    return 1.0 / slope, float(fit.intercept_[0])


def threshold_between_scores(p_pneumonia: np.ndarray, lowest_caught: float) -> float:
    """A threshold that flags ``lowest_caught`` and everything above it, placed halfway (on the
    logit scale) to the next lower score.

    A threshold equal to a score decides that image by a hair: the same network on another
    backend (Keras, float32 or int8 ONNX) moves scores by 1e-7 and more, and the image would
    flip. Halfway to the next score, every image fitted on keeps its decision on any backend.
    """
    scores = np.asarray(p_pneumonia, dtype=np.float64)
    below = scores[scores < lowest_caught]
    if len(below) == 0:
        return float(lowest_caught)
    bounded = np.clip([lowest_caught, below.max()], _EPS, 1 - _EPS)
    return float(expit(np.mean(logit(bounded))))


def threshold_for_sensitivity(y_true: np.ndarray, p_pneumonia: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on these images is at least ``target``.

    The highest such threshold gives the best specificity for that sensitivity; it sits
    between scores (:func:`threshold_between_scores`).

    Raises:
        ValueError: No pneumonia image, or a target outside (0, 1].
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    positives = np.sort(np.asarray(p_pneumonia, dtype=np.float64)[np.asarray(y_true) == 1])
    if len(positives) == 0:
        raise ValueError("choosing a threshold for sensitivity needs PNEUMONIA images")
    may_miss = int(np.floor((1.0 - target) * len(positives) + 1e-9))
    return threshold_between_scores(p_pneumonia, positives[may_miss])


def sensitivity_lower_bound(caught: float, positives: int, confidence: float) -> float:
    """One-sided lower confidence bound of a sensitivity ``caught / positives`` (Wilson score
    interval, closed form: the same figure as SciPy's ``binomtest(...).proportion_ci`` with
    ``method="wilson"``, without its cost inside the many-split checks).

    ``confidence`` 0.5 gives the observed proportion itself. ``caught`` may be fractional (an
    expected count, as when sizing a sample).
    """
    rate = caught / positives
    if confidence <= 0.5:
        return rate
    z = NormalDist().inv_cdf(confidence)  # not scipy.stats: predict's start-up pays for it
    z2n = z * z / positives
    centre = rate + z2n / 2
    spread = z * np.sqrt(rate * (1 - rate) / positives + z2n / (4 * positives))
    return float((centre - spread) / (1 + z2n))


def threshold_with_confidence(
    y_true: np.ndarray, p_pneumonia: np.ndarray, target: float, confidence: float = 0.5
) -> tuple[float, bool]:
    """The highest threshold whose sensitivity's one-sided lower ``confidence`` bound on these
    images still reaches ``target``.

    On a small sample the plain rule (``confidence=0.5``, :func:`threshold_for_sensitivity`)
    delivers its target only about half the time on new images: it is fitted to the very
    pneumonia images it is judged on. Demanding that the target hold at a lower confidence
    bound leaves a margin that shrinks as the sample grows.

    Returns:
        ``(threshold, reachable)``. When even catching every pneumonia image leaves the bound
        below the target (too few images), the threshold catches them all and ``reachable``
        is ``False``.

    Raises:
        ValueError: No pneumonia image, or ``target`` or ``confidence`` out of range.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    if confidence == 0.5:
        return threshold_for_sensitivity(y_true, p_pneumonia, target), True
    positives = np.sort(np.asarray(p_pneumonia, dtype=np.float64)[np.asarray(y_true) == 1])
    n = len(positives)
    if n == 0:
        raise ValueError("choosing a threshold for sensitivity needs PNEUMONIA images")
    misses = 0
    while misses + 1 < n and sensitivity_lower_bound(n - misses - 1, n, confidence) >= target:
        misses += 1
    reachable = sensitivity_lower_bound(n - misses, n, confidence) >= target
    return threshold_between_scores(p_pneumonia, positives[misses]), reachable


def fit_scaling_and_threshold(
    y_true: np.ndarray, p_raw: np.ndarray, target_sensitivity: float, confidence: float = 0.5
) -> tuple[float, float, float]:
    """``(temperature, logit bias, threshold)``: Platt scaling of raw scores, then the highest
    threshold whose sensitivity (its one-sided lower ``confidence`` bound, see
    :func:`threshold_with_confidence`; 0.5: the plain rate) reaches the target on the scaled
    scores. The one fit behind training's, the int8 export's and site calibration's operating
    points."""
    # Platt scaling rather than a temperature alone: class weights train the network for a
    # balanced prior, so its raw scores are biased against the data's real class balance.
    temperature, bias = fit_temperature_and_bias(y_true, p_raw)
    p_fitted = apply_temperature(p_raw, temperature, bias)
    threshold, _ = threshold_with_confidence(y_true, p_fitted, target_sensitivity, confidence)
    return temperature, bias, threshold


def fit_operating_point(
    y_true: np.ndarray,
    p_raw: np.ndarray,
    target_sensitivity: float,
    split: str,
    fitted_on: str,
    threshold_rule: str | None = None,
    confidence: float | None = None,
    point_fitted_on: str = VALIDATION_SPLIT,
    method: str = "Platt scaling of the logit (temperature and bias)",
) -> dict[str, Any]:
    """Platt scaling of raw scores, then the highest threshold reaching the target sensitivity.

    The rule training applies on its validation split, and the int8 export re-applies.

    Args:
        y_true: 1 for PNEUMONIA, 0 for NORMAL.
        p_raw: The network's uncalibrated P(pneumonia).
        target_sensitivity: Sensitivity the threshold must reach on these images.
        split: Description of the images, stored as ``validation_metrics["split"]``.
        fitted_on: Stored as ``calibration["fitted_on"]``.
        threshold_rule: The rule in words; given, it is stored with the target sensitivity.
        confidence: One-sided confidence of the sensitivity bound the rule demands (``None``:
            the plain rate; see :func:`threshold_with_confidence`).
        point_fitted_on: What the operating point records it was fitted on
            (:data:`VALIDATION_SPLIT` or ``SITE_SAMPLE``).
        method: The calibration's description.

    Returns:
        The model metadata entries ``threshold``, ``temperature``, ``logit_bias``,
        ``calibration`` and ``validation_metrics`` (rates at the threshold, with ECE).
    """
    from pneumoscan.metrics import binary_metrics, expected_calibration_error  # lazy: loads pandas

    temperature, bias, threshold = fit_scaling_and_threshold(
        y_true, p_raw, target_sensitivity, 0.5 if confidence is None else confidence
    )
    p_fitted = apply_temperature(p_raw, temperature, bias)
    validation = binary_metrics(y_true, p_fitted, threshold)
    validation["split"] = split
    validation["ece"] = expected_calibration_error(y_true, p_fitted)
    point = OperatingPoint(
        threshold=threshold,
        temperature=temperature,
        logit_bias=bias,
        threshold_rule=threshold_rule,
        target_sensitivity=None if threshold_rule is None else target_sensitivity,
        confidence=confidence,
        fitted_on=point_fitted_on,
    )
    return point.to_metadata() | {
        "calibration": {
            "method": method,
            "fitted_on": fitted_on,
            "n": len(y_true),
            "ece_before": expected_calibration_error(y_true, p_raw),
            "ece_after": validation["ece"],
        },
        "validation_metrics": validation,
    }
