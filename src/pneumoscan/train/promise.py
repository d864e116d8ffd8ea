"""The site promise: how often a calibration rule delivers less sensitivity than it promised.

A hospital runs ``pneumoscan calibrate`` on its own labelled sample, and the sensitivity it
prints is what the project promises. Twice on unseen images of a new site a rule chosen by a
point estimate delivered less than it promised (0.927 against 0.963). The split check below
replays the hospital's situation many times on its own sample: split the patients into a
calibration half and a check half, fit the rule on the first half, and count how often the
second half's sensitivity falls below the target. A rule is kept as the default only when that
happens in at most :data:`MAX_FAILURE_RATE` of the splits.

The check half is small, so its own sampling noise counts against the rule as well: the check
is stricter than deployment on a large population, which is the side to err on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from pneumoscan.inference.calibration import (
    apply_temperature,
    fit_temperature_and_bias,
    sensitivity_lower_bound,
    threshold_with_confidence,
)

#: One-sided confidences the automatic rule chooses among (0.5: no margin).
CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99)
#: Largest share of patient splits allowed to deliver less than the target sensitivity.
MAX_FAILURE_RATE = 0.05
#: Repeats of the two-way patient split; each gives two splits (either half calibrates).
SPLIT_REPEATS = 100
#: Below this expected specificity, more than one normal X-ray in five is flagged and the
#: worklist stops being a triage: the sample is said not to support the target.
USEFUL_SPECIFICITY = 0.80


@dataclass(frozen=True)
class SplitCheck:
    """What one rule (a confidence) delivered on the check halves of the patient splits.

    Attributes:
        confidence: One-sided confidence of the rule (see
            :func:`pneumoscan.inference.calibration.threshold_with_confidence`).
        splits: Number of splits.
        failure_rate: Share of splits whose check-half sensitivity fell below the target.
        sensitivity: Mean check-half sensitivity.
        sensitivity_range: 5th and 95th percentiles over splits.
        specificity: Mean check-half specificity.
        specificity_range: 5th and 95th percentiles over splits.
        per_subtype: Per pneumonia subtype (``bacteria``, ``virus``): mean ``sensitivity``,
            its 5th-95th percentile ``range``, and ``failure_rate`` against the same target.
    """

    confidence: float
    splits: int
    failure_rate: float
    sensitivity: float
    sensitivity_range: tuple[float, float]
    specificity: float
    specificity_range: tuple[float, float]
    per_subtype: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


def patient_splits(
    y_true: np.ndarray, patients: np.ndarray, repeats: int = SPLIT_REPEATS, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(calibration, check)`` index pairs: class-stratified halves of the patients, each
    half calibrating once per repeat."""
    splits = []
    for repeat in range(repeats):
        halves = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed + repeat)
        for calibration, check in halves.split(y_true, y_true, patients):
            splits.append((calibration, check))
    return splits


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    low, high = np.nanpercentile(values, [5, 95])
    return float(low), float(high)


def split_check(
    y_true: np.ndarray,
    p_raw: np.ndarray,
    patients: np.ndarray,
    subtypes: np.ndarray,
    target: float,
    confidences: tuple[float, ...] = CONFIDENCES,
    repeats: int = SPLIT_REPEATS,
    seed: int = 0,
) -> list[SplitCheck]:
    """Replay the site calibration on many patient splits of a labelled sample, per rule.

    Each split fits Platt scaling and, for every confidence, the threshold on its calibration
    half, then measures the check half. The same splits serve every confidence, so the rules
    are compared on equal terms.

    Args:
        y_true: 1 for PNEUMONIA, 0 for NORMAL.
        p_raw: Raw P(pneumonia) as new images of the site will get it (for a refitted head,
            its out-of-fold scores).
        patients: Patient id per image (a patient never straddles the halves).
        subtypes: Subtype per image (``bacteria``, ``virus``, ``normal``...).
        target: Sensitivity the rule must deliver.
        confidences: The rules to check.
        repeats: Two-way splits (each gives two).
        seed: Seed of the first split.

    Returns:
        One :class:`SplitCheck` per confidence, in the given order.
    """
    y_true = np.asarray(y_true).astype(int)
    subtypes = np.asarray(subtypes).astype(str)
    kinds = sorted(set(subtypes[y_true == 1]))
    splits = patient_splits(y_true, patients, repeats, seed)
    sens = np.full((len(confidences), len(splits)), np.nan)
    spec = np.full_like(sens, np.nan)
    by_kind = {kind: np.full_like(sens, np.nan) for kind in kinds}
    for s, (calibration, check) in enumerate(splits):
        temperature, bias = fit_temperature_and_bias(y_true[calibration], p_raw[calibration])
        p_cal = apply_temperature(p_raw[calibration], temperature, bias)
        p_check = apply_temperature(p_raw[check], temperature, bias)
        y_check, kind_check = y_true[check], subtypes[check]
        for c, confidence in enumerate(confidences):
            threshold, _ = threshold_with_confidence(
                y_true[calibration], p_cal, target, confidence
            )
            flagged = p_check >= threshold
            sens[c, s] = flagged[y_check == 1].mean()
            spec[c, s] = (~flagged[y_check == 0]).mean()
            for kind in kinds:
                members = (y_check == 1) & (kind_check == kind)
                if members.any():
                    by_kind[kind][c, s] = flagged[members].mean()
    checks = []
    for c, confidence in enumerate(confidences):
        per_subtype = {
            kind: {
                "sensitivity": float(np.nanmean(values[c])),
                "range": _percentiles(values[c]),
                "failure_rate": float(np.nanmean(values[c] < target)),
            }
            for kind, values in by_kind.items()
        }
        checks.append(
            SplitCheck(
                confidence=confidence,
                splits=len(splits),
                failure_rate=float(np.mean(sens[c] < target)),
                sensitivity=float(np.mean(sens[c])),
                sensitivity_range=_percentiles(sens[c]),
                specificity=float(np.mean(spec[c])),
                specificity_range=_percentiles(spec[c]),
                per_subtype=per_subtype,
            )
        )
    return checks


def choose_rule(
    checks: list[SplitCheck], max_failure_rate: float = MAX_FAILURE_RATE
) -> tuple[SplitCheck, bool]:
    """The least conservative rule whose failure rate is within bounds.

    Returns:
        ``(check, supported)``: the lowest confidence failing in at most ``max_failure_rate``
        of the splits; when none does, the most conservative rule and ``False``.
    """
    ordered = sorted(checks, key=lambda check: check.confidence)
    for check in ordered:
        if check.failure_rate <= max_failure_rate:
            return check, True
    return ordered[-1], False


def pneumonia_images_needed(target: float, confidence: float = 0.95, limit: int = 5000) -> int:
    """Pneumonia images a sample needs before a threshold that catches
    ``(1 + target) / 2`` of them (half the misses the target tolerates) has its one-sided lower
    ``confidence`` bound at ``target``: from there the margin stops costing most of the
    specificity."""
    caught_share = (1.0 + target) / 2
    for n in range(10, limit, 5):
        if sensitivity_lower_bound(caught_share * n, n, confidence) >= target:
            return n
    return limit


def support_warning(
    chosen: SplitCheck,
    supported: bool,
    target: float,
    n_pneumonia: int,
    expected_specificity: float,
) -> str | None:
    """Why the sample cannot keep the promise at a useful specificity, and how many labelled
    images would; ``None`` when it can.

    Args:
        chosen: The rule's split check.
        supported: Whether any rule kept the failure rate within bounds.
        target: The target sensitivity.
        n_pneumonia: Pneumonia images in the sample.
        expected_specificity: The cross-validated specificity of the rule fitted on the whole
            sample (the split check's halves fit on half the images and flag more).
    """
    if supported and expected_specificity >= USEFUL_SPECIFICITY:
        return None
    needed = pneumonia_images_needed(target)
    more = max(needed - n_pneumonia, 0)
    reason = (
        f"no rule kept a sensitivity of {target:.0%} in {1 - MAX_FAILURE_RATE:.0%} of patient "
        f"splits of this sample (the most careful fell short in {chosen.failure_rate:.0%})"
        if not supported
        else f"keeping a sensitivity of {target:.0%} costs specificity: expected "
        f"{expected_specificity:.0%} (below {USEFUL_SPECIFICITY:.0%})"
    )
    advice = (
        f"about {needed} pneumonia images (label about {more} more, with normal X-rays in "
        "proportion) would let the margin narrow"
        if more
        else "more labelled images narrow the margin"
    )
    return (
        f"{reason}. With {n_pneumonia} pneumonia images the threshold needs a wide margin; "
        f"{advice}. A lower --target-sensitivity is the other choice."
    )
