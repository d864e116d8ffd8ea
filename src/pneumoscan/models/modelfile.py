"""Model files that carry their own metadata.

A pneumoscan model is a Keras ``.keras`` archive (a zip) with one extra member,
``pneumoscan.json``: classes, input size, preprocessing, threshold, calibration, data
fingerprint, recipe, versions and validation metrics. The metadata is read with ``zipfile``
alone, so inspecting a model never imports TensorFlow.
"""

from __future__ import annotations

import json
import platform
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pneumoscan.constants import CLASSES, DEFAULT_MODEL_PATH, METADATA_MEMBER
from pneumoscan.data.preprocess import PreprocessConfig
from pneumoscan.errors import InvalidInputError, ModelFileError
from pneumoscan.jsonio import atomic_write, dumps

if TYPE_CHECKING:
    import keras

FORMAT_VERSION = 1
#: ``OperatingPoint.fitted_on`` values.
VALIDATION_SPLIT = "validation split"
SITE_SAMPLE = "site sample"
#: Names of the zip members pneumoscan adds beside Keras' own.
EXTRA_MEMBER_PREFIX = "pneumoscan_"
REQUIRED_KEYS = ("arch", "classes", "preprocess", "threshold")


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that shape a model's numbers."""
    versions = {"python": platform.python_version()}
    for package in ("pneumoscan", "keras", "tensorflow-cpu", "tensorflow", "numpy", "pillow"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def now_utc() -> str:
    """Current time as an ISO 8601 string (UTC, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def resolve_model_path(model: str | Path | None) -> Path:
    """Return the model file to use: ``model``, a run folder's ``model.keras``, or the shipped one.

    Raises:
        ModelFileError: The path does not exist.
    """
    if model is None:
        path = DEFAULT_MODEL_PATH
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "model.keras"
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found (give a .keras file or a run folder)")
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Read a model file's pneumoscan metadata without loading the network.

    Raises:
        ModelFileError: Not a zip, no metadata member, or required keys missing.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            metadata: dict[str, Any] = json.loads(archive.read(METADATA_MEMBER))
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{path}: not a Keras model archive ({exc})") from exc
    except KeyError as exc:
        raise ModelFileError(
            f"{path}: no {METADATA_MEMBER} inside; it was not saved by pneumoscan, so its "
            "classes, preprocessing and threshold are unknown"
        ) from exc
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ModelFileError(f"{path}: metadata lacks {missing}")
    return metadata


def write_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    """Replace the metadata member of a model file, atomically."""
    _replace_member(Path(path), METADATA_MEMBER, dumps(metadata).encode())


def _replace_member(path: Path, name: str, data: bytes) -> None:
    """Rewrite the zip with member ``name`` added or replaced; the file is swapped in whole."""
    with (
        atomic_write(path) as tmp,
        zipfile.ZipFile(path) as source,
        zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for item in source.infolist():
            if item.filename != name:
                out.writestr(item, source.read(item.filename))
        out.writestr(name, data)


def read_member(path: str | Path, name: str) -> bytes | None:
    """Bytes of an extra zip member of a model file (e.g. OOD statistics), or ``None``.

    Raises:
        ModelFileError: The file is not a zip archive.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(name) if name in archive.namelist() else None
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelFileError(f"{path}: not a Keras model archive ({exc})") from exc


def write_member(path: str | Path, name: str, data: bytes) -> None:
    """Add or replace an extra zip member of a model file, atomically (Keras ignores it)."""
    if name == METADATA_MEMBER:
        raise InvalidInputError(f"use write_metadata for {METADATA_MEMBER}")
    _replace_member(Path(path), name, data)


def extra_members(path: str | Path) -> dict[str, bytes]:
    """The pneumoscan members of a model file beside its metadata (the OOD detector, the head
    prior...): everything a re-saved network must carry over to refuse and adapt as before."""
    with zipfile.ZipFile(path) as archive:
        return {
            name: archive.read(name)
            for name in archive.namelist()
            if name.startswith(EXTRA_MEMBER_PREFIX) and name != METADATA_MEMBER
        }


def save_model(
    model: keras.Model,
    path: str | Path,
    metadata: dict[str, Any],
    members_from: str | Path | None = None,
) -> Path:
    """Save a Keras model with its metadata; the file appears only once complete.

    Args:
        model: The network.
        path: Where to write.
        metadata: The pneumoscan metadata.
        members_from: A model file whose extra members (:func:`extra_members`) the new file
            keeps: a network re-saved after a site refit still refuses what it refused.
    """
    path = Path(path)
    metadata = {"format_version": FORMAT_VERSION, "saved": now_utc()} | metadata
    carried = extra_members(members_from) if members_from is not None else {}
    with atomic_write(path) as tmp:
        model.save(tmp)
        write_metadata(tmp, metadata)
        for name, data in carried.items():
            _replace_member(Path(tmp), name, data)
    return path


@dataclass(frozen=True)
class OperatingPoint:
    """How a model turns its raw score into a decision: Platt scaling of the logit
    (``temperature``, ``logit_bias``), then ``threshold`` on the calibrated P(pneumonia), with
    the rule that chose it. The one schema of these metadata keys, read and written here only.
    """

    threshold: float
    temperature: float = 1.0
    logit_bias: float = 0.0
    threshold_rule: str | None = None
    target_sensitivity: float | None = None
    #: One-sided confidence of the sensitivity bound the rule demanded (None: the plain rate).
    confidence: float | None = None
    #: What it was fitted on: :data:`VALIDATION_SPLIT` or :data:`SITE_SAMPLE` (None: unrecorded,
    #: files written before it was; ``site_calibration`` in the metadata then tells).
    fitted_on: str | None = None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> OperatingPoint:
        """The operating point in a model's metadata (``KeyError`` without a threshold)."""
        target = metadata.get("target_sensitivity")
        rule = metadata.get("threshold_rule")
        confidence = metadata.get("threshold_confidence")
        fitted_on = metadata.get("threshold_fitted_on")
        if fitted_on is None and "site_calibration" in metadata:
            fitted_on = SITE_SAMPLE
        return cls(
            threshold=float(metadata["threshold"]),
            temperature=float(metadata.get("temperature", 1.0)),
            logit_bias=float(metadata.get("logit_bias", 0.0)),
            threshold_rule=None if rule is None else str(rule),
            target_sensitivity=None if target is None else float(target),
            confidence=None if confidence is None else float(confidence),
            fitted_on=None if fitted_on is None else str(fitted_on),
        )

    @property
    def site_calibrated(self) -> bool:
        """Whether a site's own sample set it (an export must keep it, never refit it on our
        validation split)."""
        return self.fitted_on == SITE_SAMPLE

    def to_metadata(self) -> dict[str, Any]:
        """The metadata entries, in the order model files have always had them; the rule, the
        target, the confidence and the data it was fitted on are left out when unknown."""
        entries: dict[str, Any] = {"threshold": self.threshold}
        if self.threshold_rule is not None:
            entries["threshold_rule"] = self.threshold_rule
        if self.target_sensitivity is not None:
            entries["target_sensitivity"] = self.target_sensitivity
        if self.confidence is not None:
            entries["threshold_confidence"] = self.confidence
        if self.fitted_on is not None:
            entries["threshold_fitted_on"] = self.fitted_on
        return entries | {"temperature": self.temperature, "logit_bias": self.logit_bias}


class ModelMetadataView:
    """Properties read from a model's metadata, shared by the Keras and ONNX model holders."""

    metadata: dict[str, Any]
    path: Path

    @property
    def preprocess(self) -> PreprocessConfig:
        """The preprocessing this model was trained with."""
        return PreprocessConfig.from_dict(self.metadata["preprocess"])

    @property
    def operating_point(self) -> OperatingPoint:
        """Calibration, threshold and the rule that chose it (:class:`OperatingPoint`)."""
        return OperatingPoint.from_metadata(self.metadata)

    @property
    def threshold(self) -> float:
        """Operating threshold on P(pneumonia)."""
        return self.operating_point.threshold

    @property
    def temperature(self) -> float:
        """Temperature applied to the network's logit (1.0: none)."""
        return self.operating_point.temperature

    @property
    def logit_bias(self) -> float:
        """Bias added to the temperature-scaled logit (0.0: none)."""
        return self.operating_point.logit_bias

    @property
    def name(self) -> str:
        """A short label: the file name."""
        return self.path.name

    # Typed readers of the descriptive keys. Model files written by older versions may lack
    # any of them, so each has a default (an empty block or None) instead of a KeyError.

    @property
    def arch(self) -> str | None:
        """The architecture's registry name (``efficientnet_lite0``...)."""
        return _optional_str(self.metadata.get("arch"))

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in output order (default: :data:`~pneumoscan.constants.CLASSES`)."""
        return tuple(self.metadata.get("classes", CLASSES))

    @property
    def stored_temperature(self) -> float | None:
        """The temperature as the file stores it (``None`` in files without calibration);
        :attr:`temperature` gives the value applied (1.0 when absent)."""
        value = self.metadata.get("temperature")
        return None if value is None else float(value)

    @property
    def validation_metrics(self) -> dict[str, Any]:
        """Metrics on the validation split recorded at training (empty if none)."""
        return dict(self.metadata.get("validation_metrics") or {})

    @property
    def data_info(self) -> dict[str, Any]:
        """The training-data block: ``root``, ``fingerprint``, ``split`` (empty if none)."""
        return dict(self.metadata.get("data") or {})

    @property
    def training_data_root(self) -> str | None:
        """The training data's folder as recorded at training."""
        return _optional_str(self.data_info.get("root"))

    @property
    def split_record(self) -> dict[str, Any]:
        """How the training data was split: ``method``, ``val_fraction``, ``seed``, ``counts``
        (empty if unrecorded)."""
        return dict(self.data_info.get("split") or {})

    @property
    def recipe(self) -> dict[str, Any]:
        """The training recipe (``batchnorm``, augmentation...; empty if unrecorded)."""
        return dict(self.metadata.get("recipe") or {})

    @property
    def ood(self) -> dict[str, Any] | None:
        """The fitted OOD detector's block (``method``, ``layers``...), ``None`` if unfitted."""
        block = self.metadata.get("ood")
        return dict(block) if block else None

    @property
    def ood_layers(self) -> list[str]:
        """The layers the OOD detector reads features from (empty: none, or unfitted)."""
        return list((self.ood or {}).get("layers") or [])

    @property
    def model_card(self) -> str | None:
        """The model card text stored in the file, if any."""
        return _optional_str(self.metadata.get("model_card"))

    @property
    def saved(self) -> str | None:
        """When the file was saved (UTC, ISO 8601)."""
        return _optional_str(self.metadata.get("saved"))

    @property
    def versions(self) -> dict[str, str]:
        """Library versions that made the file (empty if unrecorded)."""
        return {str(k): str(v) for k, v in (self.metadata.get("versions") or {}).items()}

    @property
    def training_command(self) -> str | None:
        """The command line that trained the model, if recorded."""
        return _optional_str(self.metadata.get("command"))

    @property
    def export_source_sha256(self) -> str | None:
        """For an ONNX export: the SHA-256 of the ``.keras`` file it was exported from."""
        recorded = (self.metadata.get("export") or {}).get("source_sha256")
        return str(recorded) if recorded else None


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class MetadataView(ModelMetadataView):
    """The typed view of a metadata dict on its own (no model loaded; ``path`` is where it
    was read from, if known)."""

    metadata: dict[str, Any]
    path: Path = Path()


@dataclass
class LoadedModel(ModelMetadataView):
    """A Keras network with the metadata that says how to feed and read it."""

    network: keras.Model
    metadata: dict[str, Any]
    path: Path


def load_model(model: str | Path | None = None) -> LoadedModel:
    """Load a model file (default: the shipped model) with its metadata.

    Raises:
        ModelFileError: Missing file, missing metadata, or Keras cannot read it.
    """
    path = resolve_model_path(model)
    metadata = read_metadata(path)
    import keras  # lazy: loads TensorFlow

    # Importing the registry registers custom layers that saved models may reference.
    import pneumoscan.models  # noqa: F401

    try:
        network = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for damaged archives.
        raise ModelFileError(f"{path}: Keras could not load the network ({exc})") from exc
    return LoadedModel(network=network, metadata=metadata, path=path)
