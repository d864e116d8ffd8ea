"""Which images the model reads: declared rules, a reason for every refusal."""

from __future__ import annotations

import pydicom
import pytest

from pneumoscan.data.selection import refusal


def _header(**values: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.Modality = "DX"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    "values",
    [{}, {"BodyPartExamined": "CHEST", "ViewPosition": "PA"}, {"ViewPosition": "AP"},
     {"Modality": "CR", "BodyPartExamined": "THORAX"}],
)  # fmt: skip
def test_frontal_chest_radiographs_pass(values: dict[str, str]) -> None:
    assert refusal(_header(**values)) is None


@pytest.mark.parametrize(
    ("values", "said"),
    [
        ({"BodyPartExamined": "HAND"}, "BodyPartExamined is HAND"),
        ({"ViewPosition": "LL"}, "ViewPosition is LL"),
        ({"Modality": "CT"}, "Modality is CT"),
        ({"PresentationIntentType": "FOR PROCESSING"}, "PresentationIntentType is FOR PROC"),
        ({"Modality": ""}, "Modality is empty"),
    ],
)
def test_other_images_are_refused_with_the_reason(values: dict[str, str], said: str) -> None:
    reason = refusal(_header(**values))
    assert reason is not None and said in reason and "frontal chest" in reason
