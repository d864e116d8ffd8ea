"""Which DICOM images the model is fit to read, declared as data (as MONAI Deploy's series
selector does): a lateral view or a hand image is refused with a reason, never scored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Modalities of projection radiographs.
MODALITIES = ("DX", "CR")
#: Body Part Examined values of a chest image (an empty value is accepted: many devices
#: leave it blank).
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG")
#: View Position values of a frontal view (empty accepted, as above).
FRONTAL_VIEWS = ("PA", "AP")


@dataclass(frozen=True)
class Rule:
    """One check on a DICOM header: the attribute, the values accepted, and what a refusal
    says. A missing or empty attribute passes when ``allow_empty``."""

    keyword: str
    accepted: tuple[str, ...]
    what: str
    allow_empty: bool = True

    def reason(self, ds: Dataset) -> str | None:
        """Why ``ds`` fails this rule, or ``None`` when it passes."""
        value = str(ds.get(self.keyword, "") or "").strip().upper()
        if not value and self.allow_empty:
            return None
        if value in self.accepted:
            return None
        shown = value or "empty"
        return (
            f"{self.keyword} is {shown}: the model reads {self.what} "
            f"({', '.join(self.accepted)}) only"
        )


RULES: tuple[Rule, ...] = (
    Rule("Modality", MODALITIES, "projection radiographs", allow_empty=False),
    Rule("BodyPartExamined", CHEST_BODY_PARTS, "chest images"),
    Rule("ViewPosition", FRONTAL_VIEWS, "frontal views"),
    # A "for processing" image holds raw detector values, not the picture a radiologist reads.
    Rule("PresentationIntentType", ("FOR PRESENTATION",), "images meant for display"),
)


def refusal(ds: Dataset, rules: tuple[Rule, ...] = RULES) -> str | None:
    """The first reason the image is not fit for the model, or ``None``."""
    for rule in rules:
        reason = rule.reason(ds)
        if reason is not None:
            return f"not a frontal chest radiograph: {reason}"
    return None
