"""The Python API: load a model once, then predict, explain and evaluate (e.g. in a notebook).

Modelled on TorchXRayVision's ``get_model``, timm's ``create_model`` and scikit-learn's
``predict_proba``::

    import pneumoscan
    model = pneumoscan.load()                      # the shipped model, int8 ONNX, no TensorFlow
    table = model.predict(pneumoscan.samples())    # one row per file, as `pneumoscan predict`
    p = model.predict_proba(images)                # (n, 2), columns in model.classes order
    cam = model.heatmap(path, out="cam.png")       # Grad-CAM (loads the Keras network lazily)
    metrics = pneumoscan.evaluate(model, "site_sample/")

One answer per image: files go through :func:`pneumoscan.inference.predict.predict_files`, exactly
as
``pneumoscan predict`` runs them; in-memory images (PIL images, arrays) are encoded losslessly
as PNG and decoded by the same :func:`pneumoscan.data.preprocess.decode_image`, then scored by the
same :func:`pneumoscan.inference.predict.predict_batch`, so an array and the file it came from get
the
same probability. Pixels follow one convention (:mod:`pneumoscan.data.pixels`): uint8 in [0, 255];
float in [0, 1] is converted, grey images get three channels, any size is resized by the
model's preprocessing.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from pneumoscan.constants import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    POSITIVE_CLASS,
    SAMPLES_DIR,
)
from pneumoscan.data.pixels import UINT8_MAX, as_uint8
from pneumoscan.data.preprocess import DecodedImage, DecodeFailure, try_decode_image
from pneumoscan.errors import ImageReadError, InvalidInputError
from pneumoscan.inference.explain import gradcam, heatmap_title, overlay_png
from pneumoscan.inference.predict import check_batching, display_at_original_aspect, list_inputs
from pneumoscan.inference.prediction import IDENTIFIER_FIELDS, Prediction
from pneumoscan.inference.predictor import Predictor
from pneumoscan.inference.scorer import subtype_head
from pneumoscan.jsonio import atomic_write, jsonable
from pneumoscan.models.modelfile import now_utc

if TYPE_CHECKING:
    import keras

    from pneumoscan.inference.scorer import AnyModel

#: A file or folder (any ``os.PathLike`` works too).
PathLike = str | Path
#: One in-memory image: a PIL image or an array (H×W, H×W×C; C is 1, 3 or 4).
ImageLike = Image.Image | np.ndarray
#: What :meth:`Model.predict` accepts.
Inputs = PathLike | ImageLike | Sequence[PathLike] | Sequence[ImageLike]

#: Columns of :meth:`Model.predict`'s table after the first (``path``, or ``index``).
COLUMNS = (
    "status",
    "probability",
    "decision",
    "near_threshold",
    "op_score",
    "p_viral",
    "subtype_estimate",
    "reason",
    "ood_score",
    "threshold",
    "model_sha256",
    "pneumoscan_version",
    "scored_at",
    *IDENTIFIER_FIELDS,
)
# Modes Pillow writes to PNG losslessly; other modes (F, CMYK, ...) go through TIFF.
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
_TIFF_MODES = frozenset({"F", "CMYK", "YCbCr"})
_U16_MAX = 65535


def samples() -> list[Path]:
    """The sample X-rays shipped with pneumoscan (two NORMAL, two PNEUMONIA), sorted.

    The same files as ``pneumoscan predict --samples``.
    """
    return sorted(SAMPLES_DIR.glob("*/*.jpeg"))


# --------------------------------------------------------------------------- inputs


def _encoded(image: Image.Image) -> bytes:
    """The image as lossless bytes that :func:`pneumoscan.data.preprocess.decode_image` reads."""
    buffer = io.BytesIO()
    if image.mode in _PNG_MODES:
        # compress_level 1: the bytes are decoded at once, so speed beats size.
        image.save(buffer, format="PNG", compress_level=1)
    elif image.mode in _TIFF_MODES:
        image.save(buffer, format="TIFF")
    else:
        image.convert("RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _pil_bytes(image: Image.Image) -> bytes:
    # A PIL image opened from a file still carries the file's EXIF orientation, which the
    # decoder would apply to the file; PNG drops EXIF, so apply it here to match.
    return _encoded(ImageOps.exif_transpose(image))


def _array_bytes(array: np.ndarray, what: str) -> bytes:
    """One image array as lossless bytes for the decoder, or an error naming the fix."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] not in (3, 4):
        if array.shape[0] in (1, 3, 4):
            raise InvalidInputError(
                f"{what}: shape {array.shape} looks channels-first (C×H×W); give H×W×C: "
                "np.moveaxis(a, 0, -1)"
            )
        raise InvalidInputError(
            f"{what}: shape {array.shape} is not H×W×C with C in 1, 3 or 4; for a batch of "
            "grey images add a channel axis: a[..., None]"
        )
    if array.ndim not in (2, 3):
        raise InvalidInputError(f"{what}: shape {array.shape}; give H×W, H×W×3 or N×H×W×3")
    if array.ndim == 2 and np.issubdtype(array.dtype, np.integer) and array.size:
        low, high = int(array.min()), int(array.max())
        if low >= 0 and UINT8_MAX < high <= _U16_MAX:
            # A 10-16 bit grey X-ray: a 16-bit PNG, mapped by the bit depth it uses exactly
            # as a 16-bit PNG file is (preprocess._high_bit_depth_to_8bit).
            return _encoded(Image.fromarray(array.astype(np.uint16)))
    return _encoded(Image.fromarray(as_uint8(array, what)))


def _in_memory(inputs: ImageLike | Sequence[ImageLike]) -> list[bytes]:
    """Lossless bytes of each in-memory image: a PIL image, an array or a batch, or a list."""
    items: Sequence[Any] = [inputs] if isinstance(inputs, Image.Image | np.ndarray) else inputs
    encoded: list[bytes] = []
    for item in items:
        if isinstance(item, Image.Image):
            encoded.append(_pil_bytes(item))
            continue
        array = np.asarray(item)
        if array.ndim == 4:
            if array.shape[-1] not in (1, 3, 4) and array.shape[1] in (1, 3, 4):
                raise InvalidInputError(
                    f"images: shape {array.shape} looks channels-first (N×C×H×W); give "
                    "N×H×W×C: np.moveaxis(a, 1, -1)"
                )
            encoded.extend(_array_bytes(image, f"image {len(encoded)}") for image in array)
        else:
            encoded.append(_array_bytes(array, f"image {len(encoded)}"))
    return encoded


def _split_inputs(inputs: Inputs) -> tuple[list[Path] | None, list[bytes]]:
    """``(paths, [])`` for files and folders, or ``(None, image bytes)``."""
    if isinstance(inputs, str | bytes | os.PathLike):
        # Path, as the CLI gets them: str(Path(p)) is the path a CLI result names; bytes
        # are a file name as the OS keeps it (not necessarily UTF-8).
        return [Path(os.fsdecode(inputs))], []
    if isinstance(inputs, Image.Image | np.ndarray):
        return None, _in_memory(inputs)
    if not isinstance(inputs, Sequence):
        raise TypeError(
            f"cannot predict a {type(inputs).__name__}; give a path, a folder, a list of paths, "
            "a PIL image or a uint8 array (H×W, H×W×3 or N×H×W×3)"
        )
    items = list(inputs)
    if not items:
        raise InvalidInputError("no inputs given: pass a path, a folder, a list of paths or images")
    paths = [
        Path(os.fsdecode(item)) for item in items if isinstance(item, str | bytes | os.PathLike)
    ]
    if len(paths) == len(items):
        return paths, []
    if not paths:
        return None, _in_memory(items)  # type: ignore[arg-type]  # all images, checked there
    raise TypeError(
        "mixed paths and in-memory images in one call; predict them in two calls, or save "
        "the images to files"
    )


def _decode_all(
    data: Sequence[bytes], model: AnyModel, first: int = 0
) -> list[DecodedImage | DecodeFailure]:
    """Decode in-memory images as files are decoded; a failure is a value, not a raise.

    Messages call each image ``image <its index>``, counting from ``first`` (the position of
    ``data[0]`` among all the images given).
    """
    return [
        try_decode_image(item, model.preprocess, name=f"image {first + index}")
        for index, item in enumerate(data)
    ]


# --------------------------------------------------------------------------- the model


class Predictions(pd.DataFrame):
    """The table :meth:`Model.predict` returns: a DataFrame that prints whole.

    Paths are long, and pandas' default print hides the middle columns behind ``...`` when a
    row is wider than 80 characters; a short table (up to ``display.max_rows``) prints every
    column instead. Notebooks show the usual HTML table.
    """

    @property
    def _constructor(self) -> type[Predictions]:
        return Predictions

    def __repr__(self) -> str:
        if len(self) > int(pd.get_option("display.max_rows")):
            return super().__repr__()
        return self.to_string()


class Model:
    """A loaded pneumoscan model: predictions, probabilities, heatmaps.

    Make one with :func:`load`. Scoring runs on the backend chosen there (``onnx`` or
    ``keras``); the Keras network for :meth:`heatmap` is loaded on first use only, and never
    scores.

    Attributes:
        predictor: The composition root shared with the CLI and the service.
        backend: ``onnx`` or ``keras``: what scores images.
        path: The file the scores come from (the ``.onnx`` export or the ``.keras`` file).
    """

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor
        self.backend = predictor.backend
        self.path = predictor.model.path

    def __repr__(self) -> str:
        return (
            f"pneumoscan.Model({self.name!r}, backend={self.backend!r}, "
            f"threshold={self.threshold:.3f})"
        )

    @property
    def name(self) -> str:
        """The model file's name."""
        return self.predictor.name

    @property
    def threshold(self) -> float:
        """Operating threshold on P(pneumonia): at or above it the decision is PNEUMONIA."""
        return self.predictor.threshold

    @property
    def model_sha256(self) -> str | None:
        """SHA-256 of the scoring file (every prediction records it)."""
        return self.predictor.identity.model_sha256

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in the column order of :meth:`predict_proba`."""
        return self.predictor.model.classes

    @property
    def has_subtype(self) -> bool:
        """Whether the model carries a bacterial-or-viral head, so that :meth:`predict` fills
        ``p_viral`` and ``subtype_estimate`` for PNEUMONIA decisions (an estimate, not a
        microbiological diagnosis; :mod:`pneumoscan.models.subtype`)."""
        return subtype_head(self.predictor.model) is not None

    @property
    def metadata(self) -> dict[str, Any]:
        """The model's metadata: preprocessing, threshold, calibration, data, metrics..."""
        return self.predictor.model.metadata

    @property
    def network(self) -> keras.Model:
        """The Keras network (Grad-CAM needs its gradients); loaded, with TensorFlow, on first
        use.

        Raises:
            ModelFileError: The model was opened from an ``.onnx`` file with no matching
                ``.keras`` file beside it.
        """
        return self.predictor.network

    def _results(
        self, inputs: Inputs, batch_size: int, ood_check: bool
    ) -> tuple[str, list[Prediction]]:
        """``(first column name, one prediction per input, in input order)``."""
        check_batching(batch_size)
        paths, data = _split_inputs(inputs)
        if paths is not None:
            entries = list_inputs(paths)
            return "path", list(
                self.predictor.predict_entries(entries, batch_size, ood_check=ood_check)
            )
        return "index", list(self._predict_images(data, batch_size, ood_check))

    def _predict_images(
        self, data: Sequence[bytes], batch_size: int, ood_check: bool
    ) -> Iterator[Prediction]:
        model = self.predictor.model
        for start in range(0, len(data), batch_size):
            items = _decode_all(data[start : start + batch_size], model, start)
            decoded = [item for item in items if isinstance(item, DecodedImage)]
            names = [
                f"image {start + i}"
                for i, item in enumerate(items)
                if isinstance(item, DecodedImage)
            ]
            scored = iter(self.predictor.predict_decoded(decoded, names, ood_check=ood_check))
            for offset, item in enumerate(items):
                if isinstance(item, DecodeFailure):
                    failed = Prediction.failed(f"image {start + offset}", item.message)
                    yield failed.traced(self.predictor.identity, now_utc())
                else:
                    yield next(scored)

    def predict(
        self,
        inputs: Inputs,
        *,
        batch_size: int = 32,
        ood_check: bool = True,
        anonymise: bool = False,
        fhir: PathLike | None = None,
        overwrite: bool = False,
    ) -> Predictions:
        """One row per input, in input order: the values ``pneumoscan predict`` writes.

        Args:
            inputs: A file, a folder (every file under it), a list of paths, a PIL image, a
                uint8 array (H×W, H×W×3 or N×H×W×3; float in [0, 1] is converted), or a
                list of PIL images or arrays. Any size: images are resized like files.
            batch_size: Images decoded and scored at a time.
            ood_check: Reject images that do not look like frontal chest X-rays.
            anonymise: Leave the DICOM identifiers out (their columns stay, empty).
            fhir: Also write a FHIR R4 Bundle per study of the DICOM inputs to this
                ``.ndjson`` file (as ``pneumoscan predict --fhir``; needs the ``pacs``
                extra). Not with ``anonymise``: a FHIR report names its patient and study.
            overwrite: Replace an existing ``fhir`` file.

        Returns:
            A :class:`pandas.DataFrame` (:class:`Predictions`) with columns ``path``
            (``index`` for in-memory images), ``status`` (``ok``, ``rejected``: not a
            chest X-ray, ``error``: unreadable),
            ``probability`` (P(pneumonia), NaN unless ok), ``decision`` (NORMAL or
            PNEUMONIA at :attr:`threshold`), ``near_threshold`` (close to the threshold:
            read with care), ``op_score`` (the score with the threshold at 0.5),
            ``p_viral`` and ``subtype_estimate`` (for a PNEUMONIA decision of a model with
            a subtype head, :attr:`has_subtype`: the calibrated probability that the
            pneumonia is viral, and ``bacterial`` or ``viral`` at the head's threshold; an
            estimate, not a microbiological diagnosis; NaN and empty for NORMAL, rejected
            and unreadable inputs, and for every input of a model without a head), ``reason``
            (why rejected or unreadable), ``ood_score`` (above 1 is rejected; NaN when not
            computed), the model's identity: ``threshold``, ``model_sha256``,
            ``pneumoscan_version``, ``scored_at``, and for a DICOM file its
            ``study_instance_uid``, ``series_instance_uid``, ``sop_instance_uid``,
            ``accession_number`` and ``patient_id`` (empty for other inputs and with
            ``anonymise``). A DICOM file whose header is not a frontal chest radiograph's
            (a hand, a lateral, a "for processing" image) is ``rejected`` with the reason.
            ``DataFrame.attrs`` holds ``model``, ``backend``, ``threshold`` and
            ``model_sha256``.

        Raises:
            TypeError: An input of an unsupported type (the message lists the accepted ones).
            InvalidInputError: No inputs, a batch size below 1, an array whose shape or
                values are not an image (also a ``ValueError``), a ``fhir`` file not ending
                in ``.ndjson``, or ``fhir`` with ``anonymise``.
            OutputExistsError: The ``fhir`` file exists and not ``overwrite``.
        """
        writer = None
        if fhir is not None:
            if anonymise:
                raise InvalidInputError(
                    "fhir and anonymise together: a FHIR report names its patient and study"
                )
            from pneumoscan.interop.records import ReportedModel  # lazy: the pacs extra
            from pneumoscan.interop.writers import open_fhir_writer  # lazy: the pacs extra

            writer = open_fhir_writer(fhir, ReportedModel.of(self.predictor), overwrite=overwrite)
        first, results = self._results(inputs, batch_size, ood_check)
        if writer is not None:
            for result in results:
                writer.write(result)
            writer.close()
        if anonymise:
            results = [result.anonymised() for result in results]
        rows = []
        for index, result in enumerate(results):
            row = result.as_row()
            key: Any = index if first == "index" else row["path"]
            rows.append({first: key} | {column: row[column] for column in COLUMNS})
        table = Predictions(rows, columns=[first, *COLUMNS])
        for column in ("probability", "op_score", "p_viral", "ood_score", "threshold"):
            table[column] = table[column].astype(float)
        table.attrs.update(
            model=self.name,
            backend=self.backend,
            threshold=self.threshold,
            model_sha256=self.model_sha256,
        )
        return table

    def predict_proba(
        self, images: Inputs, *, batch_size: int = 32, ood_check: bool = False
    ) -> np.ndarray:
        """Class probabilities ``(n, 2)``, columns in :attr:`classes` order (scikit-learn).

        Every readable image is scored, X-ray or not (scikit-learn semantics); the values
        equal :meth:`predict`'s ``probability`` for the images it accepts. An image the
        checks would have rejected (blank, colour, inverted...) raises a ``UserWarning``
        naming it. Use :meth:`predict` for triage: it rejects such images.

        Args:
            images: As :meth:`predict` takes.
            batch_size: Images scored at a time.
            ood_check: Also run the out-of-distribution checks; rejected images get NaN.

        Raises:
            ImageReadError: An input could not be read (the message names it).
        """
        _, results = self._results(images, batch_size, ood_check)
        failed = [r for r in results if r.status == "error"]
        if failed:
            listed = "; ".join(str(r.reason) for r in failed[:3])
            raise ImageReadError(
                f"{len(failed)} of {len(results)} inputs could not be read ({listed}); "
                "Model.predict lists every unreadable file without raising"
            )
        doubtful = [(i, r) for i, r in enumerate(results) if r.warning]
        if doubtful:
            listed = "; ".join(f"{r.path or f'image {i}'}: {r.warning}" for i, r in doubtful[:3])
            warnings.warn(
                f"{len(doubtful)} of {len(results)} images do not look like frontal chest "
                f"X-rays, and their probabilities mean nothing ({listed}); predict() rejects "
                "them",
                UserWarning,
                stacklevel=2,
            )
        positive = np.array(
            [np.nan if r.probability is None else r.probability for r in results],
            dtype=np.float64,
        )
        proba = np.empty((len(results), len(self.classes)), dtype=np.float64)
        index = self.classes.index(POSITIVE_CLASS)
        proba[:, index] = positive
        proba[:, 1 - index] = 1.0 - positive
        return proba

    def heatmap(
        self,
        image: PathLike | ImageLike,
        out: PathLike | None = None,
        class_name: str | None = None,
    ) -> np.ndarray:
        """Grad-CAM map of where the model found the evidence for a class, for one image.

        Loads the Keras network (and TensorFlow) on first use, whatever the scoring backend;
        the decision shown is the scoring backend's.

        Args:
            image: A file, a PIL image or one array (as :meth:`predict` takes).
            out: Also draw the titled overlay (as ``pneumoscan predict --heatmaps`` does)
                to this file: ``.png``, or ``.jpg`` / ``.jpeg``.
            class_name: The class whose evidence to show (default: the image's own decision,
                which needs the image to be accepted).

        Returns:
            ``(H, W)`` float32 map in [0, 1] at the model's input size.

        Raises:
            InvalidInputError: More than one image, an unknown class, an ``out`` file of
                another format, or (with no ``class_name``) an image that is rejected or
                unreadable (also a ``ValueError``).
            ModelFileError: No Keras network for this model.
        """
        target_format = None if out is None else _picture_format(Path(out))
        paths, data = _split_inputs(image)
        if paths is not None:
            entries = list_inputs(paths)
            problems = [e for e in entries if not isinstance(e, str)]
            if problems:
                raise InvalidInputError(f"cannot draw a heatmap: {problems[0].message}")
            paths = [Path(str(e)) for e in entries]
        if (paths is not None and len(paths) != 1) or (paths is None and len(data) != 1):
            raise InvalidInputError("heatmap draws one image at a time; loop over the images")
        label = Path(paths[0]).name if paths is not None else "image"
        model = self.predictor.model
        decoded = (
            try_decode_image(paths[0], model.preprocess)
            if paths is not None
            else _decode_all(data, model)[0]
        )
        if isinstance(decoded, DecodeFailure):
            raise InvalidInputError(f"cannot draw a heatmap: {decoded.message}")
        result = self.predictor.predict_decoded([decoded], [label])[0]
        if class_name is None:
            if result.status != "ok":
                raise InvalidInputError(
                    f"{label}: {result.status} ({result.reason}); pass "
                    "class_name='PNEUMONIA' to draw the map anyway"
                )
            class_name = str(result.decision)
        if class_name not in self.classes:
            raise InvalidInputError(f"unknown class {class_name!r}; choose one of {self.classes}")
        cam = gradcam(
            self.network, decoded.pixels[None], class_index=self.classes.index(class_name)
        )
        heatmap = np.asarray(cam[0])
        if out is not None and target_format is not None:
            if result.status == "ok":
                title = heatmap_title(label, result)
            else:
                title = f"{label}: evidence for {class_name} ({result.status})"
            png = overlay_png(display_at_original_aspect(decoded), heatmap, title)
            _save_picture(png, Path(out), target_format)
        return heatmap


#: Picture formats :meth:`Model.heatmap` writes, by file extension.
_PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def _picture_format(path: Path) -> str:
    """The Pillow format for a picture file's extension.

    Raises:
        InvalidInputError: Another extension.
    """
    chosen = _PICTURE_FORMATS.get(path.suffix.lower())
    if chosen is None:
        raise InvalidInputError(
            f"{path}: give a .png, .jpg or .jpeg file for the heatmap (its format)"
        )
    return chosen


def _save_picture(png: bytes, path: Path, picture_format: str) -> None:
    """Write PNG bytes to ``path`` in ``picture_format``, atomically."""
    with atomic_write(path) as partial:
        if picture_format == "PNG":
            partial.write_bytes(png)
        else:
            Image.open(io.BytesIO(png)).convert("RGB").save(partial, format=picture_format)


# --------------------------------------------------------------------------- functions


def load(model: PathLike | None = None, backend: str = "auto") -> Model:
    """Open a model for prediction (default: the shipped one), as ``pneumoscan predict`` does.

    Args:
        model: A ``.keras`` file, a run folder, or an ``.onnx`` export (``None``: shipped).
        backend: ``auto`` (the ONNX export saved beside the model when there is one, as the
            shipped model has, else Keras), ``onnx`` (ONNX Runtime; exports to a temporary
            file if none is saved) or ``keras``. Only ``keras`` imports TensorFlow.

    Raises:
        ModelFileError: The file is missing or unreadable.
        InvalidInputError: Unknown backend (also a ``ValueError``).
    """
    predictor = Predictor.open(model, backend)
    if predictor.note:
        warnings.warn(predictor.note, stacklevel=2)
    return Model(predictor)


def evaluate(
    model: Model | PathLike | None,
    data: PathLike,
    *,
    split: str = "test",
    batch_size: int = 32,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Metrics of a model on a labelled folder: what ``pneumoscan evaluate --json`` writes.

    Equal to ``pneumoscan evaluate DATA --model MODEL.path --json out.json`` (``MODEL.path``
    is the file that scores: the ``.onnx`` export for the default backend).

    Args:
        model: A :class:`Model`, or a model path for :func:`load` (``None``: shipped model).
        data: Dataset root or a folder with ``NORMAL/`` and ``PNEUMONIA/``.
        split: Split of a dataset root to evaluate (a bare class folder is used whole).
        batch_size: Images scored at a time.
        n_resamples: Bootstrap resamples (over patients) for the confidence intervals.
        seed: Bootstrap seed.

    Returns:
        JSON values (NaN as ``None``): ``n``, ``auc``, ``sensitivity``, ``specificity``,
        ``confusion_matrix``, intervals, ``model``, ``data``, ``split``, ``skipped``...,
        and ``scores``: one ``path, label, p_pneumonia, patient_id`` record per image.

    Raises:
        DatasetError: The folder holds no readable labelled image.
    """
    # lazy: loads scikit-learn
    from pneumoscan.evaluate.scoring import evaluate as run_evaluation

    chosen = model if isinstance(model, Model) else load(model)
    metrics = run_evaluation(
        data, chosen.predictor, split, batch_size, n_resamples=n_resamples, seed=seed
    )
    # The CLI's --json leaves out the printed text report; so does this.
    result: dict[str, Any] = jsonable({k: v for k, v in metrics.items() if k != "report"})
    return result
