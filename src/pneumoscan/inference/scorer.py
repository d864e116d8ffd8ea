"""Scoring: a pure function from decoded images to P(pneumonia), on Keras or ONNX Runtime.

Both backends sit behind one interface: a model object with ``metadata``, ``preprocess``,
``threshold``, ``temperature`` and a ``network`` that has ``predict_on_batch``. The Keras one is
:class:`pneumoscan.models.modelfile.LoadedModel`; the ONNX Runtime one is :class:`OnnxModel`, loaded
from a file written by :mod:`pneumoscan.inference.export`. :class:`Scorer` adds the network's pooled
features (for the out-of-distribution check) to the same forward pass.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoscan.constants import METADATA_MEMBER, POSITIVE_INDEX
from pneumoscan.data.pipeline import iter_decoded_batches
from pneumoscan.data.pixels import as_uint8
from pneumoscan.data.preprocess import to_model_input
from pneumoscan.errors import InvalidInputError, ModelFileError
from pneumoscan.inference.calibration import apply_temperature
from pneumoscan.models.efficientnet_lite import TOP_ACTIVATION
from pneumoscan.models.modelfile import LoadedModel, ModelMetadataView
from pneumoscan.models.subtype import SubtypeHead

if TYPE_CHECKING:
    import keras

BACKENDS = ("keras", "onnx")
#: ONNX metadata keys: the model's pneumoscan metadata, and its OOD detector (base64 npz).
ONNX_OOD_KEY = "pneumoscan_ood.npz.b64"
#: Output names of the graph :mod:`pneumoscan.inference.export` writes, in order.
PROBABILITIES = "probabilities"
FEATURES = "ood_features"


class OnnxNetwork:
    """An ONNX Runtime session with the Keras ``predict_on_batch`` interface."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [output.name for output in session.get_outputs()]

    def run(self, inputs: np.ndarray) -> list[np.ndarray]:
        """Every output of the graph for a float32 batch in [0, 1]."""
        feed = {self.input_name: np.ascontiguousarray(inputs, dtype=np.float32)}
        return [np.asarray(out) for out in self.session.run(None, feed)]

    def predict_on_batch(self, inputs: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, classes)`` (the first output)."""
        return self.run(inputs)[0]

    @property
    def has_features(self) -> bool:
        """Whether the graph also outputs pooled features for the OOD check."""
        return len(self.output_names) > 1


@dataclass
class OnnxModel(ModelMetadataView):
    """An exported model on ONNX Runtime, with the same properties as ``LoadedModel``."""

    network: OnnxNetwork
    metadata: dict[str, Any]
    path: Path
    ood_npz: bytes | None = None


AnyModel = LoadedModel | OnnxModel


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for any ONNX file (no pneumoscan metadata needed).

    Args:
        path: The ``.onnx`` file.
        threads: Intra-op threads (default: ONNX Runtime's choice, one per core).

    Raises:
        ModelFileError: Missing file, or ONNX Runtime cannot load it.
    """
    import onnxruntime as ort  # lazy: loads ONNX Runtime

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: ONNX file not found")
    # No telemetry from a hospital's machine (ORT_DISABLE_TELEMETRY is set on import, too).
    ort.disable_telemetry_events()
    options = ort.SessionOptions()
    # Idle ONNX Runtime threads spin for work by default; on a 2-core machine that spinning
    # takes the cores the decoding threads need (measured: benchmarks/predict_throughput.py).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ModelFileError(f"{path}: ONNX Runtime could not load it ({exc})") from exc


def load_onnx_model(path: str | Path, threads: int | None = None) -> OnnxModel:
    """Open an ONNX file written by ``pneumoscan export`` on ONNX Runtime (CPU).

    Args:
        path: The ``.onnx`` file; its metadata carries preprocessing, threshold, temperature
            and the OOD detector, so no Keras file is needed.
        threads: Intra-op threads (default: ONNX Runtime's choice, one per core).

    Raises:
        ModelFileError: Missing file, not ONNX, or no pneumoscan metadata inside.
    """
    path = Path(path)
    session = onnx_session(path, threads)
    properties = session.get_modelmeta().custom_metadata_map
    if METADATA_MEMBER not in properties:
        raise ModelFileError(
            f"{path}: no pneumoscan metadata inside; export it with `pneumoscan export`"
        )
    metadata = json.loads(properties[METADATA_MEMBER])
    encoded = properties.get(ONNX_OOD_KEY)
    ood_npz = base64.b64decode(encoded) if encoded else None
    return OnnxModel(OnnxNetwork(session), metadata, path, ood_npz)


#: ``ModelProto.metadata_props`` (repeated ``StringStringEntryProto``: key = 1, value = 2).
_METADATA_PROPS_FIELD = 14


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """A protobuf base-128 varint at ``at``: ``(value, next offset)``."""
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """``(field number, wire type, value)`` of one protobuf message's top-level fields."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
            yield number, wire, value
        elif wire == 2:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise ValueError("truncated field")
            yield number, wire, data[at : at + size]
            at += size
        elif wire in (1, 5):
            at += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def onnx_metadata_props(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read from its protobuf wire format.

    Not ``onnx.load``: importing the ``onnx`` package costs ``pneumoscan predict`` about half a
    second of start-up (it loads ml_dtypes), and only these few strings are needed to match an
    export to its model file.

    Raises:
        ValueError: The bytes are not a protobuf message.
    """
    properties: dict[str, str] = {}
    for number, wire, value in _fields(Path(path).read_bytes()):
        if number == _METADATA_PROPS_FIELD and wire == 2 and isinstance(value, bytes):
            entry = {n: v for n, w, v in _fields(value) if w == 2 and isinstance(v, bytes)}
            properties[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
    return properties


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The pneumoscan metadata of an exported ONNX file, without starting ONNX Runtime.

    Raises:
        ModelFileError: Missing, not ONNX, or no pneumoscan metadata inside.
    """
    path = Path(path)
    try:
        properties = onnx_metadata_props(path)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not a readable ONNX file ({exc})") from exc
    if METADATA_MEMBER not in properties:
        raise ModelFileError(f"{path}: no pneumoscan metadata inside")
    try:
        metadata: dict[str, Any] = json.loads(properties[METADATA_MEMBER])
    except ValueError as exc:
        raise ModelFileError(f"{path}: damaged pneumoscan metadata ({exc})") from exc
    return metadata


def p_pneumonia(model: AnyModel, pixels: np.ndarray, calibrated: bool = True) -> np.ndarray:
    """P(pneumonia) for a batch of decoded uint8 images ``(n, H, W, 3)``.

    Pure in its inputs (no I/O), so a cluster engine can map it over batches unchanged.

    Args:
        model: The loaded model (Keras or ONNX Runtime).
        pixels: Output of :func:`pneumoscan.data.preprocess.decode_to_uint8`, stacked; float
            pixels in [0, 1] (:func:`pneumoscan.data.preprocess.preprocess_image`) are converted
            back to uint8 exactly (:func:`pneumoscan.data.pixels.as_uint8`).
        calibrated: Apply the temperature and logit bias stored in the model (``False`` gives
            the network's raw softmax, which calibration fits on).
    """
    if len(pixels) == 0:
        return np.zeros(0, dtype=np.float64)
    raw = Scorer(model, with_subtype=False).forward(as_uint8(pixels, "pixels")).p_raw
    return calibrate_scores(model, raw) if calibrated else raw


def calibrate_scores(model: AnyModel, p_raw: np.ndarray) -> np.ndarray:
    """The model's stored calibration (temperature and logit bias) applied to raw scores."""
    return apply_temperature(p_raw, model.temperature, model.logit_bias)


def _check_size(model: AnyModel, pixels: np.ndarray) -> None:
    expected = tuple(model.preprocess.image_size)
    if tuple(pixels.shape[1:3]) != expected:
        raise InvalidInputError(
            f"images are {pixels.shape[1:3]}, the model expects {expected}: decode files with "
            "pneumoscan.data.preprocess.decode_to_uint8, or use pneumoscan.load().predict_proba, "
            "which resizes any image"
        )


def feature_network(network: keras.Model, layers: Sequence[str]) -> keras.Model:
    """A Keras model with two outputs: the class probabilities and the global averages of
    ``layers``' feature maps, concatenated (the OOD detector's network features)."""
    import keras  # lazy: loads TensorFlow

    pooled = [
        keras.layers.GlobalAveragePooling2D(name=f"ood_pool_{i}")(network.get_layer(name).output)
        for i, name in enumerate(layers)
    ]
    features = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate(name=FEATURES)(pooled)
    return keras.Model(network.inputs, [network.outputs[0], features], name="pneumoscan_scorer")


def _pad_batch(inputs: np.ndarray) -> np.ndarray:
    """Pad a batch with zero images to the next power of two.

    Rejected images leave batches of every size, and Keras traces its predict function again
    for each new batch size; powers of two bound that to a handful of traces.
    """
    n = len(inputs)
    size = 1 << max(0, (n - 1).bit_length())
    if size == n:
        return inputs
    padding = np.zeros((size - n, *inputs.shape[1:]), dtype=inputs.dtype)
    return np.concatenate([inputs, padding])


def keras_probabilities(network: Any, pixels: np.ndarray) -> Any:
    """A Keras network's outputs for uint8 images ``(n, H, W, 3)``, the batch padded to a
    power of two (:func:`_pad_batch`) and the padding cut off again; a list of arrays when
    the network has several outputs."""
    outputs = network.predict_on_batch(_pad_batch(to_model_input(pixels)))
    if isinstance(outputs, list | tuple):
        return [np.asarray(out)[: len(pixels)] for out in outputs]
    return np.asarray(outputs)[: len(pixels)]


@dataclass
class ForwardPass:
    """One batch through the network.

    Attributes:
        p_raw: Uncalibrated P(pneumonia), ``(n,)`` float64.
        features: Pooled network features ``(n, d)`` for the OOD check, or ``None``.
        p_viral: Calibrated P(viral) from the subtype head ``(n,)``, or ``None`` (the model
            has no subtype head).
    """

    p_raw: np.ndarray
    features: np.ndarray | None
    p_viral: np.ndarray | None = None


def subtype_head(model: AnyModel) -> SubtypeHead | None:
    """The model's bacterial-or-viral head (:mod:`pneumoscan.models.subtype`), if it has one.

    Raises:
        ModelFileError: The model's subtype entry is damaged.
    """
    entry = model.metadata.get("subtype")
    return None if entry is None else SubtypeHead.from_metadata(entry, str(model.path))


def p_viral_from_features(head: SubtypeHead, features: np.ndarray) -> np.ndarray:
    """Calibrated P(viral) from pooled features: the head, then its Platt scaling (fitted on
    P(bacterial), where its threshold lives)."""
    point = head.point
    return 1.0 - apply_temperature(
        head.raw_bacterial(features), point.temperature, point.logit_bias
    )


class Scorer:
    """A model on its backend, giving probabilities and OOD features in one pass.

    Args:
        model: Keras ``LoadedModel`` or ``OnnxModel``.
        feature_layers: Layers whose pooled outputs the OOD detector uses (Keras); an ONNX
            graph exported with features outputs them itself. Empty: probabilities only, or
            the subtype head's features when the model has one.
        with_subtype: Score the subtype head when the model has one (``False``: P(pneumonia)
            alone, without building a feature network for it).
    """

    def __init__(
        self, model: AnyModel, feature_layers: Sequence[str] = (), with_subtype: bool = True
    ) -> None:
        self.model = model
        self.backend = "onnx" if isinstance(model, OnnxModel) else "keras"
        self._keras: Any = None
        self.subtype = subtype_head(model) if with_subtype else None
        if self.subtype is not None and not feature_layers:
            # The head reads the pooled last feature map, which the forward pass then returns.
            feature_layers = [TOP_ACTIVATION]
        self.with_features = bool(feature_layers)
        if isinstance(model, LoadedModel) and feature_layers:
            self._keras = feature_network(model.network, feature_layers)
        if isinstance(model, OnnxModel):
            self.with_features = self.with_features and model.network.has_features

    def forward(self, pixels: np.ndarray) -> ForwardPass:
        """Raw P(pneumonia) and (if enabled) features for uint8 images ``(n, H, W, 3)``."""
        if len(pixels) == 0:
            return ForwardPass(np.zeros(0), np.zeros((0, 0)) if self.with_features else None)
        _check_size(self.model, pixels)
        features = None
        if isinstance(self.model, OnnxModel):
            outputs = self.model.network.run(to_model_input(pixels))
            probabilities = outputs[0]
            if self.with_features:
                features = outputs[1]
        elif self._keras is not None:
            probabilities, features = keras_probabilities(self._keras, pixels)
        else:
            probabilities = keras_probabilities(self.model.network, pixels)
        probabilities = np.asarray(probabilities)[: len(pixels)]
        features = None if features is None else np.asarray(features)[: len(pixels)]
        p_raw = probabilities[:, POSITIVE_INDEX].astype(np.float64)
        if features is None:
            return ForwardPass(p_raw, None)
        features = features.astype(np.float64)
        p_viral = None
        if self.subtype is not None:
            p_viral = p_viral_from_features(self.subtype, features)
        return ForwardPass(p_raw, features, p_viral)

    def calibrate(self, p_raw: np.ndarray) -> np.ndarray:
        """Apply the model's calibration (temperature and logit bias) to raw probabilities."""
        return calibrate_scores(self.model, p_raw)


@dataclass
class PathsForward:
    """One forward pass over files, in input order (:func:`forward_paths`).

    Attributes:
        p_raw: Uncalibrated P(pneumonia) per path; NaN where the file could not be read.
        features: Pooled features per path (NaN rows where unreadable), or ``None``.
        p_viral: Calibrated P(viral) per path (NaN where unreadable), or ``None`` (no head).
        errors: ``(position, message)`` of each unreadable file.
    """

    p_raw: np.ndarray
    features: np.ndarray | None
    p_viral: np.ndarray | None
    errors: list[tuple[int, str]]


def forward_paths(
    scorer: Scorer,
    paths: Sequence[str],
    batch_size: int = 32,
    on_progress: Callable[[int], None] | None = None,
) -> PathsForward:
    """The scorer's outputs for every path, decoded in batches; unreadable files get NaN and
    an error, never an exception. The one loop behind evaluation, the int8 export's refit and
    site calibration's subtype refit."""
    p_raw = np.full(len(paths), np.nan)
    features: np.ndarray | None = None
    p_viral: np.ndarray | None = None
    errors: list[tuple[int, str]] = []
    for batch in iter_decoded_batches(paths, scorer.model.preprocess, batch_size=batch_size):
        if batch.indices:
            forward = scorer.forward(batch.pixels)
            p_raw[batch.indices] = forward.p_raw
            if forward.features is not None:
                if features is None:
                    features = np.full((len(paths), forward.features.shape[1]), np.nan)
                features[batch.indices] = forward.features
            if forward.p_viral is not None:
                if p_viral is None:
                    p_viral = np.full(len(paths), np.nan)
                p_viral[batch.indices] = forward.p_viral
        errors.extend((position, failure.message) for position, failure in batch.errors)
        if on_progress is not None:
            on_progress(len(batch.indices) + len(batch.errors))
    return PathsForward(p_raw, features, p_viral, errors)


@dataclass
class FileScore:
    """The outcome for one file: a probability, or the reason there is none."""

    position: int
    path: str
    probability: float | None
    error: str | None


def score_files(
    model: AnyModel, paths: Sequence[str], batch_size: int = 32, calibrated: bool = True
) -> Iterator[FileScore]:
    """Score files in input order, streaming; unreadable files yield an error, not an exception."""
    for batch in iter_decoded_batches(paths, model.preprocess, batch_size=batch_size):
        p = p_pneumonia(model, batch.pixels, calibrated=calibrated)
        scores = dict(zip(batch.indices, p, strict=True))
        messages = {position: failure.message for position, failure in batch.errors}
        for position in sorted([*scores, *messages]):
            probability = scores.get(position)
            yield FileScore(
                position=position,
                path=paths[position],
                probability=None if probability is None else float(probability),
                error=messages.get(position),
            )
