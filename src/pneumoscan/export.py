"""Export a model file to ONNX, self-contained, for ONNX Runtime.

The graph is the network plus the pooled feature maps the out-of-distribution check uses, so
one ONNX Runtime call gives both. Keras' own exporter (``Model.export(format="onnx")``, which
drives tf2onnx on the TensorFlow backend) writes it; the pneumoscan metadata (preprocessing,
threshold, temperature, OOD thresholds) and the OOD detector's arrays go into the ONNX file's
metadata properties, so ``predict --model model.onnx`` needs neither TensorFlow nor the
``.keras`` file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pneumoscan.constants import METADATA_MEMBER
from pneumoscan.errors import ModelFileError
from pneumoscan.inference import FEATURES, ONNX_OOD_KEY, PROBABILITIES, feature_network
from pneumoscan.jsonio import jsonable
from pneumoscan.modelfile import load_model, now_utc, read_member
from pneumoscan.ood import OOD_MEMBER, ood_feature_layers

FORMATS = ("onnx",)
DEFAULT_OPSET = 17


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
    """

    path: Path
    source: Path
    source_sha256: str
    outputs: list[str]
    ood: bool
    size_bytes: int


def export_onnx(
    model: str | Path | None, out: str | Path, opset: int = DEFAULT_OPSET
) -> ExportSummary:
    """Write ``model`` (default: the shipped one) as a self-contained ONNX file.

    Args:
        model: Model file or run folder.
        out: The ``.onnx`` file to write (replaced atomically).
        opset: ONNX opset version.

    Returns:
        What was written.

    Raises:
        ModelFileError: The model cannot be loaded or the conversion fails.
    """
    import onnx

    loaded = load_model(model)
    ood = loaded.metadata.get("ood") or {}
    layers = list(ood.get("layers") or ood_feature_layers(loaded.network))
    graph = feature_network(loaded.network, layers) if layers else loaded.network
    height, width = loaded.preprocess.image_size
    # Keras exports only models that have been called on data.
    graph.predict_on_batch(np.zeros((1, height, width, 3), np.float32))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(suffix=".onnx", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            with warnings.catch_warnings():
                # Keras' tf2onnx patch probes np.object, which NumPy 2 warns about.
                warnings.simplefilter("ignore", FutureWarning)
                graph.export(str(tmp), format="onnx", verbose=False, opset_version=opset)
        except Exception as exc:  # tf2onnx raises many types
            raise ModelFileError(f"{loaded.path}: ONNX conversion failed ({exc})") from exc
        proto = onnx.load(str(tmp))
        outputs = [PROBABILITIES, FEATURES][: len(proto.graph.output)]
        source_sha256 = file_sha256(loaded.path)
        metadata = dict(loaded.metadata) | {
            "export": {
                "format": "onnx",
                "opset": opset,
                "source": str(loaded.path),
                "source_sha256": source_sha256,
                "outputs": outputs,
                "feature_layers": layers,
                "exported": now_utc(),
            }
        }
        properties = {METADATA_MEMBER: json.dumps(jsonable(metadata), sort_keys=True)}
        ood_npz = read_member(loaded.path, OOD_MEMBER)
        if ood_npz is not None:
            properties[ONNX_OOD_KEY] = base64.b64encode(ood_npz).decode("ascii")
        onnx.helper.set_model_props(proto, properties)
        onnx.save(proto, str(tmp))
        tmp.chmod(0o644)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportSummary(
        path=out,
        source=loaded.path,
        source_sha256=source_sha256,
        outputs=outputs,
        ood=ood_npz is not None,
        size_bytes=out.stat().st_size,
    )


def onnx_matches(onnx_path: str | Path, model_path: str | Path) -> bool:
    """Whether an ONNX file was exported from exactly this model file (by content hash)."""
    import onnx

    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception:  # a damaged or foreign file simply does not match
        return False
    properties = {p.key: p.value for p in proto.metadata_props}
    try:
        recorded = json.loads(properties[METADATA_MEMBER])["export"]["source_sha256"]
    except (KeyError, ValueError, TypeError):
        return False
    return bool(recorded == file_sha256(model_path))
