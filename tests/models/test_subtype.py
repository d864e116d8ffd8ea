"""The subtype head's numbers: read back as written, refused when damaged, same call as the
network's second output."""

from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.errors import ModelFileError
from pneumoscan.models.modelfile import OperatingPoint
from pneumoscan.models.subtype import (
    BACTERIAL,
    VIRAL,
    SubtypeHead,
    subtype_targets,
    with_subtype_head,
)


def _head(threshold: float = 0.5) -> SubtypeHead:
    weights = np.random.default_rng(1).normal(size=8)
    return SubtypeHead(weights, 0.25, OperatingPoint(threshold=threshold), {"n": 3}, {"auc": 0.9})


def test_metadata_round_trip_keeps_every_number() -> None:
    head = _head(0.7)
    back = SubtypeHead.from_metadata(head.to_metadata())
    np.testing.assert_array_equal(back.weights, head.weights)
    assert back.bias == head.bias and back.point == head.point
    assert head.to_metadata()["label"] == "estimate, not a microbiological diagnosis"


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: e.pop("head"),
        lambda e: e["head"].update(weights=[]),
        lambda e: e["head"].update(weights=[1.0, float("nan")]),
        lambda e: e.pop("operating_point"),
        lambda e: e.update(operating_point=[0.5]),
        # Found by benchmarks/fuzz_subtype_metadata.py: JSON's NaN made every estimate NaN.
        lambda e: e["head"].update(bias=float("nan")),
        lambda e: e["operating_point"].update(threshold=1.5),
        lambda e: e["operating_point"].update(temperature=0.0),
    ],
)
def test_a_damaged_entry_is_refused(damage) -> None:
    entry = _head().to_metadata()
    damage(entry)
    with pytest.raises(ModelFileError, match="subtype"):
        SubtypeHead.from_metadata(entry, "m.keras")


def test_the_call_is_bacterial_when_p_bacterial_reaches_the_threshold() -> None:
    head = _head(0.6)
    assert head.call(0.39) == BACTERIAL  # P(bacterial) 0.61
    assert head.call(0.41) == VIRAL
    with pytest.raises(ValueError, match="takes 8 features"):
        head.raw_bacterial(np.zeros((2, 5)))


def test_targets_weigh_only_named_pneumonias() -> None:
    viral, known = subtype_targets(np.array(["normal", "bacteria", "virus", "unknown"]))
    assert viral.tolist() == [0, 0, 1, 0] and known.tolist() == [False, True, True, False]


def test_the_head_in_numbers_equals_the_network_output() -> None:
    import keras

    from pneumoscan.models.efficientnet_lite import build_efficientnet_lite0

    network = with_subtype_head(build_efficientnet_lite0((64, 64, 3)))
    pixels = np.random.default_rng(2).uniform(0, 1, (3, 64, 64, 3)).astype("float32")
    p_pneumonia, p_viral = network.predict_on_batch(pixels)
    kernel, bias = network.get_layer("subtype").get_weights()
    pooled = keras.Model(network.inputs, network.get_layer("avg_pool").output)(pixels)
    head = SubtypeHead(kernel[:, 0], float(bias[0]), OperatingPoint(threshold=0.5), {}, {})
    np.testing.assert_allclose(1 - head.raw_bacterial(np.asarray(pooled)), p_viral[:, 0], atol=1e-5)
    assert p_pneumonia.shape == (3, 2)
