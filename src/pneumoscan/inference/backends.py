"""Opening a model for scoring: the one place that picks a backend and finds (or makes) the
ONNX export of a Keras model."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pneumoscan.errors import InvalidInputError, ModelFileError
from pneumoscan.inference.export import export_onnx, onnx_matches
from pneumoscan.inference.scorer import BACKENDS, AnyModel, OnnxModel, load_onnx_model
from pneumoscan.models.modelfile import LoadedModel, load_model, resolve_model_path

if TYPE_CHECKING:
    import keras


def _export_to_temporary(model_path: Path) -> OnnxModel:
    """Export a ``.keras`` model to a temporary ONNX file and open it (the file is removed
    once ONNX Runtime has read it)."""
    with tempfile.TemporaryDirectory(prefix="pneumoscan-onnx-") as folder:
        target = Path(folder) / (model_path.stem + ".onnx")
        export_onnx(model_path, target)
        return load_onnx_model(target)


def saved_export(model_path: Path) -> Path | None:
    """The ONNX export beside a ``.keras`` file made from exactly that file (checked by content
    hash): ``MODEL.onnx`` (float32) first, then ``MODEL.int8.onnx``; ``None`` when neither."""
    for candidate in (model_path.with_suffix(".onnx"), model_path.with_suffix(".int8.onnx")):
        if candidate.is_file() and onnx_matches(candidate, model_path):
            return candidate
    return None


def open_model(
    model: str | Path | None,
    backend: str = "keras",
    onnx_path: str | Path | None = None,
    keras_network: bool = False,
) -> tuple[AnyModel, keras.Model | None, str | None]:
    """Open a model for prediction on a backend.

    ``model`` may be a ``.keras`` file, a run folder or an ``.onnx`` file (which implies the
    ONNX backend). For ``backend="onnx"`` with a Keras model, the ONNX file is ``onnx_path``,
    else the export saved beside the model (:func:`saved_export`), else a temporary export.
    ``backend="auto"`` takes the saved export when there is one and no Keras network is
    needed (the shipped model has an int8 one), and Keras otherwise: TensorFlow is imported
    only when it is needed.

    Args:
        model: Model file or run folder (default: the shipped model).
        backend: ``auto``, ``keras`` or ``onnx``.
        onnx_path: An exported ONNX file to use.
        keras_network: Also load the Keras network (Grad-CAM needs it on any backend).

    Returns:
        ``(model, Keras network or None, note for the user or None)``.

    Raises:
        ModelFileError: A file is missing or unreadable, or heatmaps were asked of an ONNX
            file without its Keras model.
        ValueError: Unknown backend.
    """
    if backend not in (*BACKENDS, "auto"):
        raise InvalidInputError(f"unknown backend {backend!r}; choose auto or one of {BACKENDS}")
    if model is not None and Path(model).suffix.lower() == ".onnx":
        if keras_network:
            raise ModelFileError("heatmaps need the Keras model: give --model MODEL.keras")
        return load_onnx_model(model), None, None
    path = resolve_model_path(model)
    if backend == "auto":
        saved = None if keras_network or onnx_path else saved_export(path)
        if saved is not None:
            return load_onnx_model(saved), None, None
        backend = "onnx" if onnx_path else "keras"
    if backend == "keras":
        loaded = load_model(path)
        return loaded, loaded.network, None
    network = load_model(path).network if keras_network else None
    if onnx_path is not None:
        return load_onnx_model(onnx_path), network, None
    saved = saved_export(path)
    if saved is not None:
        return load_onnx_model(saved), network, None
    note = (
        f"exported {path.name} to ONNX for this run; `pneumoscan export --model {path} --out "
        f"{path.with_suffix('.onnx').name}` once saves that time"
    )
    return _export_to_temporary(path), network, note


def load_any_model(model: str | Path | None) -> AnyModel:
    """Open a ``.keras`` file, run folder or shipped model on Keras, or an ``.onnx`` export
    (float32 or int8) on ONNX Runtime.

    Raises:
        ModelFileError: The file is missing or unreadable.
    """
    return open_model(model, "keras")[0]


def keras_source(model: str | Path | None, loaded: AnyModel) -> Path | None:
    """The ``.keras`` file a scoring model came from (Grad-CAM needs its network), if known.

    A Keras model is its own source; an export chosen for a ``.keras`` file or run folder came
    from it; an ``.onnx`` file given directly came from ``MODEL.keras`` beside it when that
    file's hash is the one the export recorded (``MODEL.onnx`` and ``MODEL.int8.onnx`` are
    exported there).
    """
    if isinstance(loaded, LoadedModel):
        return loaded.path
    if model is None or Path(model).suffix.lower() != ".onnx":
        return resolve_model_path(model)
    candidate = Path(model).with_suffix("").with_suffix(".keras")
    if candidate.is_file() and onnx_matches(Path(model), candidate):
        return candidate
    return None
