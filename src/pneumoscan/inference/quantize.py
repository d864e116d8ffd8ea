"""Int8 post-training quantisation of an exported ONNX model, for fast CPU inference.

ONNX Runtime's static quantiser (QDQ format, per-channel int8 weights, uint8 activations with
min-max ranges) calibrated on images from the model's own *training* split, never its
validation split, so the validation figures of the quantised model stay honest.

Only the convolutional trunk is quantised (``Conv`` and the activations and residual additions
between them). The head (global pooling, dense layer, softmax) stays float32: a uint8 softmax
output has only 256 levels, which ties most confident cases: quantising everything cost the
shipped model 0.006 validation ROC AUC, against 0.001 with the head in float32 (the model card
has the shipped export's figures).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.constants import (
    CLASSES,
    DEFAULT_BACTERIAL_SENSITIVITY,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_SEED,
    POSITIVE_INDEX,
)
from pneumoscan.data.pipeline import iter_decoded_batches
from pneumoscan.data.preprocess import PreprocessConfig, to_model_input
from pneumoscan.errors import DatasetError
from pneumoscan.models.modelfile import VALIDATION_SPLIT, MetadataView, OperatingPoint
from pneumoscan.models.subtype import subtype_targets

QUANTIZE_CHOICES = ("int8",)
#: Operators quantised; everything else (pooling head, Gemm, Softmax) stays float32.
QUANTIZED_OPS = ("Conv", "Clip", "Relu", "Add", "MaxPool")
_CALIBRATION_BATCH = 32


def calibration_paths(
    data: str | Path,
    metadata: dict[str, Any],
    n_images: int = DEFAULT_CALIBRATION_IMAGES,
    seed: int = DEFAULT_SEED,
) -> list[str]:
    """A seeded sample of the model's training images in ``data`` (never validation or test).

    The validation split is re-created from the fraction and seed recorded in the model, as
    ``evaluate --split val`` does, and left out.

    Raises:
        DatasetError: ``data`` holds none of the model's training images.
    """
    from pneumoscan.data.dataset import assign_validation_split, scan_dataset  # lazy: loads pandas

    table = scan_dataset(data, read_headers=False)
    recorded = MetadataView(metadata).split_record
    if recorded and set(table["split"]) != {"all"}:
        table = assign_validation_split(table, recorded["val_fraction"], recorded["seed"])
    training = table[table["split"].isin(["train", "all"])]
    if training.empty:
        raise DatasetError(f"{data}: no training images to calibrate the quantisation on")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(training), size=min(n_images, len(training)), replace=False)
    return [str(p) for p in training["path"].to_numpy()[np.sort(chosen)]]


class _Batches:
    """ONNX Runtime ``CalibrationDataReader``: decoded, preprocessed float32 batches."""

    def __init__(self, input_name: str, paths: Sequence[str], config: PreprocessConfig) -> None:
        self.input_name = input_name
        self.skipped: list[str] = []
        self.used = 0
        self._batches: Iterator[Any] = iter_decoded_batches(paths, config, _CALIBRATION_BATCH)

    def get_next(self) -> dict[str, np.ndarray] | None:
        for batch in self._batches:
            self.skipped += [failure.message for _, failure in batch.errors]
            if len(batch.indices):
                self.used += len(batch.indices)
                return {self.input_name: to_model_input(batch.pixels)}
        return None


def quantize_int8(
    source: str | Path, out: str | Path, paths: Sequence[str], config: PreprocessConfig
) -> dict[str, Any]:
    """Write an int8 copy of the float32 ONNX file ``source`` to ``out``.

    Args:
        source: Float32 ONNX file (from :func:`pneumoscan.inference.export.export_onnx`).
        out: Where to write the quantised model.
        paths: Calibration images (see :func:`calibration_paths`).
        config: The model's preprocessing.

    Returns:
        What was done, for the export's metadata: method, operators, images used and skipped.

    Raises:
        DatasetError: No calibration image could be read.
    """
    import onnx  # lazy: loads onnx

    # lazy: loads ONNX Runtime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # lazy: loads ONNX Runtime
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out)
    prepared = out.with_name(out.stem + ".prep.onnx")
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
        reader = _Batches(input_name, paths, config)
        quantize_static(
            str(prepared),
            str(out),
            reader,  # duck-typed CalibrationDataReader
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        prepared.unlink(missing_ok=True)
    if reader.used == 0:
        out.unlink(missing_ok=True)
        raise DatasetError(f"none of the {len(paths)} calibration images could be read")
    return {
        "method": "onnxruntime static QDQ: int8 per-channel weights, uint8 min-max activations",
        "operators": list(QUANTIZED_OPS),
        "float32": "global pooling, dense head, softmax",
        "calibration_images": reader.used,
        "calibration_skipped": len(reader.skipped),
    }


def refit_operating_point(
    onnx_file: str | Path, metadata: dict[str, Any], data: str | Path
) -> dict[str, Any]:
    """Platt scaling and threshold of the quantised model, refitted on the validation split.

    The same rule as training (``pneumoscan.train.loop``): Platt scaling on the model's
    patient-grouped validation split, then the highest threshold reaching the recorded target
    sensitivity. Int8 rounding moves scores near the threshold, so reusing the float32
    threshold would quietly change the operating point.

    Returns:
        Metadata entries to replace (``threshold``, ``temperature``, ``logit_bias``,
        ``calibration``, ``validation_metrics``, and ``subtype`` for a model with a subtype
        head, whose threshold is refitted the same way on its int8 features), or ``{}`` when
        the model records no target sensitivity or ``data`` has no validation split for it.
    """
    from pneumoscan.data.dataset import scan_dataset, select_split  # lazy: loads pandas
    from pneumoscan.inference.calibration import fit_operating_point  # lazy: loads SciPy

    # lazy: loads SciPy
    from pneumoscan.inference.scorer import (
        OnnxModel,
        OnnxNetwork,
        Scorer,
        forward_paths,
        onnx_session,
    )
    from pneumoscan.inference.subtype import fit_subtype_point  # lazy: loads SciPy

    point = OperatingPoint.from_metadata(metadata)
    target = point.target_sensitivity
    try:
        table = select_split(scan_dataset(data, read_headers=False), "val", metadata)
    except DatasetError:
        return {}
    if target is None or table["split"].iloc[0] != "val":
        return {}
    # The file has no pneumoscan metadata yet: the model's own goes alongside its session.
    model = OnnxModel(OnnxNetwork(onnx_session(onnx_file)), metadata, Path(onnx_file))
    scorer = Scorer(model)
    forward = forward_paths(scorer, table["path"].tolist())
    p_raw = forward.p_raw
    y_true = (table["label"] == CLASSES[POSITIVE_INDEX]).to_numpy().astype(int)
    kept = ~np.isnan(p_raw)
    refitted = fit_operating_point(
        y_true[kept],
        p_raw[kept],
        target,
        split="val (patient-grouped, from the training data); int8 model",
        fitted_on="validation split, int8 model",
        threshold_rule=point.threshold_rule,
    )
    head = scorer.subtype
    if head is not None and forward.features is not None and not head.point.site_calibrated:
        # Int8 rounding moves the pooled features too, and with them P(bacterial).
        viral, known = subtype_targets(table["subtype"].to_numpy())
        rows = known & kept
        refitted["subtype"] = fit_subtype_point(
            head,
            1 - viral[rows].astype(int),
            head.raw_bacterial(forward.features[rows]),
            head.point.target_sensitivity or DEFAULT_BACTERIAL_SENSITIVITY,
            split="val pneumonias of named cause (patient-grouped); int8 model",
            fitted_on=VALIDATION_SPLIT,
            threshold_rule=head.point.threshold_rule or "",
        ).to_metadata()
    return refitted
