"""Export a model file to ONNX, self-contained, for ONNX Runtime.

The graph is the network plus the pooled feature maps the out-of-distribution check uses, so
one ONNX Runtime call gives both. Keras' own exporter (``Model.export(format="onnx")``, which
drives tf2onnx on the TensorFlow backend) writes it; the pneumoscan metadata (preprocessing,
threshold, temperature, OOD thresholds) and the OOD detector's arrays go into the ONNX file's
metadata properties, so ``predict --model model.onnx`` needs neither TensorFlow nor the
``.keras`` file. ``quantize="int8"`` writes an int8 copy instead
(:mod:`pneumoscan.inference.quantize`),
calibrated on the model's training images.
"""

from __future__ import annotations

import base64
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan.constants import (
    ASSETS_DIR,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_SEED,
    METADATA_MEMBER,
    OOD_MEMBER,
)
from pneumoscan.errors import (
    InvalidInputError,
    ModelFileError,
    OutputExistsError,
    PneumoscanError,
)
from pneumoscan.inference.ood import ood_feature_layers
from pneumoscan.inference.quantize import (
    QUANTIZE_CHOICES,
    calibration_paths,
    quantize_int8,
    refit_operating_point,
)
from pneumoscan.inference.scorer import (
    FEATURES,
    ONNX_OOD_KEY,
    PROBABILITIES,
    feature_network,
    read_onnx_metadata,
)
from pneumoscan.jsonio import atomic_write, jsonable
from pneumoscan.models.modelfile import (
    MetadataView,
    OperatingPoint,
    load_model,
    now_utc,
    read_member,
)

FORMATS = ("onnx",)
DEFAULT_OPSET = 17


def default_export_path(model_path: str | Path, quantize: str | None = None) -> Path:
    """Where ``pneumoscan export`` writes by default: beside the model, ``MODEL.onnx`` or
    ``MODEL.int8.onnx``, which is where ``predict --backend auto`` looks
    (:func:`pneumoscan.inference.predict.saved_export`).

    The shipped model is the exception: its folder is part of the installed package (and
    already holds its int8 export), so its export goes to the current folder instead.
    """
    model_path = Path(model_path)
    suffix = f".{quantize}.onnx" if quantize else ".onnx"
    name = model_path.stem + suffix
    if model_path.resolve().parent == (ASSETS_DIR / "models").resolve():
        return Path(name)
    return model_path.with_name(name)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (records which model an export came from)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: The ONNX file.
        source: The model file it came from.
        source_sha256: That file's SHA-256 (recorded inside the export).
        outputs: Graph outputs, in order.
        ood: Whether the OOD detector went along.
        size_bytes: Size of the ONNX file.
        quantization: What :func:`pneumoscan.inference.quantize.quantize_int8` did, or ``None``.
    """

    path: Path
    source: Path
    source_sha256: str
    outputs: list[str]
    ood: bool
    size_bytes: int
    quantization: dict[str, Any] | None = None


def export_onnx(
    model: str | Path | None,
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    quantize: str | None = None,
    calibration_data: str | Path | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    seed: int = DEFAULT_SEED,
    overwrite: bool = True,
) -> ExportSummary:
    """Write ``model`` (default: the shipped one) as a self-contained ONNX file.

    Args:
        model: Model file or run folder.
        out: The ``.onnx`` file to write (replaced atomically).
        opset: ONNX opset version.
        quantize: ``None`` for float32, or ``"int8"``.
        calibration_data: Dataset holding the model's training images (needed for int8).
        calibration_images: How many training images calibrate the int8 ranges.
        seed: Seed of the calibration sample.
        overwrite: Replace ``out`` if it exists; ``False`` refuses before any work (the
            CLI's default, so ``export --out`` never replaces a file unasked).

    Returns:
        What was written.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is false.
        ModelFileError: The model cannot be loaded or the conversion fails.
        ValueError: Unknown ``quantize``, or int8 without ``calibration_data``.
        DatasetError: No calibration image could be read.
    """
    import onnx  # lazy: loads onnx

    if not overwrite and Path(out).exists():
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise InvalidInputError(
            f"unknown quantisation {quantize!r}; choose one of {QUANTIZE_CHOICES}"
        )
    if quantize is not None and calibration_data is None:
        raise InvalidInputError("int8 quantisation needs --calibration-data (the training images)")

    loaded = load_model(model)
    layers = loaded.ood_layers or list(ood_feature_layers(loaded.network))
    graph = feature_network(loaded.network, layers) if layers else loaded.network
    height, width = loaded.preprocess.image_size
    # Keras exports only models that have been called on data.
    graph.predict_on_batch(np.zeros((1, height, width, 3), np.float32))
    out = Path(out)
    with atomic_write(out) as tmp:
        try:
            with warnings.catch_warnings():
                # Keras' tf2onnx patch probes np.object, which NumPy 2 warns about.
                warnings.simplefilter("ignore", FutureWarning)
                graph.export(str(tmp), format="onnx", verbose=False, opset_version=opset)
        except Exception as exc:  # tf2onnx raises many types
            raise ModelFileError(f"{loaded.path}: ONNX conversion failed ({exc})") from exc
        quantization: dict[str, Any] | None = None
        refitted: dict[str, Any] = {}
        if quantize is not None and calibration_data is not None:
            quantization, refitted = _quantize(
                tmp, loaded.metadata, loaded.preprocess, calibration_data, calibration_images, seed
            )
        proto = onnx.load(str(tmp))
        outputs = [PROBABILITIES, FEATURES][: len(proto.graph.output)]
        source_sha256 = file_sha256(loaded.path)
        metadata = (
            dict(loaded.metadata)
            | refitted
            | {
                "export": {
                    "format": "onnx",
                    "opset": opset,
                    "source": str(loaded.path),
                    "source_sha256": source_sha256,
                    "outputs": outputs,
                    "feature_layers": layers,
                    "exported": now_utc(),
                    "quantization": quantization,
                }
            }
        )
        properties = {METADATA_MEMBER: json.dumps(jsonable(metadata), sort_keys=True)}
        ood_npz = read_member(loaded.path, OOD_MEMBER)
        if ood_npz is not None:
            properties[ONNX_OOD_KEY] = base64.b64encode(ood_npz).decode("ascii")
        onnx.helper.set_model_props(proto, properties)
        onnx.save(proto, str(tmp))
    return ExportSummary(
        path=out,
        source=loaded.path,
        source_sha256=source_sha256,
        outputs=outputs,
        ood=ood_npz is not None,
        size_bytes=out.stat().st_size,
        quantization=quantization,
    )


def _quantize(
    onnx_file: Path,
    metadata: dict[str, Any],
    preprocess: Any,
    calibration_data: str | Path,
    calibration_images: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace the float32 ``onnx_file`` by its int8 copy.

    Returns:
        The quantisation record, and the metadata entries its refitted operating point
        replaces (see :func:`pneumoscan.inference.quantize.refit_operating_point`).
    """

    paths = calibration_paths(calibration_data, metadata, calibration_images, seed)
    quantized = onnx_file.with_name(onnx_file.stem + ".int8.onnx")
    try:
        record = quantize_int8(onnx_file, quantized, paths, preprocess)
        quantized.replace(onnx_file)
    except PneumoscanError:
        raise
    except Exception as exc:  # onnxruntime's quantiser raises many types
        raise ModelFileError(f"int8 quantisation failed ({exc})") from exc
    finally:
        quantized.unlink(missing_ok=True)
    record |= {"calibration_data": str(calibration_data), "seed": seed}
    if OperatingPoint.from_metadata(metadata).site_calibrated:
        # The site's own sample set this operating point; our validation split must never
        # replace it (the site's threshold 0.4932 once became 0.9187 here).
        record["operating_point"] = "the site calibration's, kept (not refitted)"
        return record, {}
    refitted = refit_operating_point(onnx_file, metadata, calibration_data)
    if refitted:
        float32 = MetadataView(metadata).validation_metrics
        record["float32_validation"] = {
            key: float32.get(key) for key in ("auc", "sensitivity", "specificity", "threshold")
        }
        record["operating_point"] = "refitted on the validation split for the int8 model"
    else:
        record["operating_point"] = "the float32 model's (no validation split to refit on)"
    return record, refitted


def onnx_matches(onnx_path: str | Path, model_path: str | Path) -> bool:
    """Whether an ONNX file was exported from exactly this model file (by content hash)."""
    try:
        recorded = read_onnx_metadata(onnx_path)["export"]["source_sha256"]
    except (ModelFileError, KeyError, ValueError, TypeError):
        # A damaged or foreign file simply does not match.
        return False
    return bool(recorded == file_sha256(model_path))
