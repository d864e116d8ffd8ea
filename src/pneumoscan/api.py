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
from pneumoscan.errors import ImageReadError, ModelFileError
from pneumoscan.inference.explain import gradcam, heatmap_title, overlay_png
from pneumoscan.jsonio import jsonable
from pneumoscan.models.modelfile import LoadedModel, load_model, resolve_model_path

if TYPE_CHECKING:
    import keras

    from pneumoscan.inference.ood import OodDetector
    from pneumoscan.inference.scorer import AnyModel, Scorer

#: A file or folder (any ``os.PathLike`` works too).
PathLike = str | Path
#: One in-memory image: a PIL image or an array (H×W, H×W×C; C is 1, 3 or 4).
ImageLike = Image.Image | np.ndarray
#: What :meth:`Model.predict` accepts.
Inputs = PathLike | ImageLike | Sequence[PathLike] | Sequence[ImageLike]

#: Columns of :meth:`Model.predict`'s table after the first (``path``, or ``index``).
COLUMNS = ("status", "probability", "decision", "reason", "ood_score")
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
            raise ValueError(
                f"{what}: shape {array.shape} looks channels-first (C×H×W); give H×W×C: "
                "np.moveaxis(a, 0, -1)"
            )
        raise ValueError(
            f"{what}: shape {array.shape} is not H×W×C with C in 1, 3 or 4; for a batch of "
            "grey images add a channel axis: a[..., None]"
        )
    if array.ndim not in (2, 3):
        raise ValueError(f"{what}: shape {array.shape}; give H×W, H×W×3 or N×H×W×3")
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
                raise ValueError(
                    f"images: shape {array.shape} looks channels-first (N×C×H×W); give "
                    "N×H×W×C: np.moveaxis(a, 1, -1)"
                )
            encoded.extend(_array_bytes(image, f"image {len(encoded)}") for image in array)
        else:
            encoded.append(_array_bytes(array, f"image {len(encoded)}"))
    return encoded


def _split_inputs(inputs: Inputs) -> tuple[list[Path] | None, list[bytes]]:
    """``(paths, [])`` for files and folders, or ``(None, image bytes)``."""
    if isinstance(inputs, str | os.PathLike):
        # Path, as the CLI gets them: str(Path(p)) is the path a CLI result names.
        return [Path(inputs)], []
    if isinstance(inputs, Image.Image | np.ndarray):
        return None, _in_memory(inputs)
    if not isinstance(inputs, Sequence):
        raise TypeError(
            f"cannot predict a {type(inputs).__name__}; give a path, a folder, a list of paths, "
            "a PIL image or a uint8 array (H×W, H×W×3 or N×H×W×3)"
        )
    items = list(inputs)
    if not items:
        raise ValueError("no inputs given: pass a path, a folder, a list of paths or images")
    paths = [Path(item) for item in items if isinstance(item, str | os.PathLike)]
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
    ``keras``); the Keras network for :meth:`heatmap` is loaded on first use only.

    Attributes:
        backend: ``onnx`` or ``keras``: what scores images.
        path: The file the scores come from (the ``.onnx`` export or the ``.keras`` file).
    """

    def __init__(
        self,
        loaded: AnyModel,
        keras_path: Path | None = None,
        network: keras.Model | None = None,
    ) -> None:
        from pneumoscan.inference.scorer import OnnxModel  # lazy: loads SciPy

        self._loaded = loaded
        self._keras_path = keras_path
        self._network = network
        self._detector: OodDetector | None = None
        self._detector_loaded = False
        self._scorers: dict[bool, Scorer] = {}
        self.backend = "onnx" if isinstance(loaded, OnnxModel) else "keras"
        self.path = loaded.path

    def __repr__(self) -> str:
        return (
            f"pneumoscan.Model({self.name!r}, backend={self.backend!r}, "
            f"threshold={self.threshold:.3f})"
        )

    @property
    def name(self) -> str:
        """The model file's name."""
        return self._loaded.name

    @property
    def threshold(self) -> float:
        """Operating threshold on P(pneumonia): at or above it the decision is PNEUMONIA."""
        return self._loaded.threshold

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, in the column order of :meth:`predict_proba`."""
        return self._loaded.classes

    @property
    def metadata(self) -> dict[str, Any]:
        """The model's metadata: preprocessing, threshold, calibration, data, metrics..."""
        return self._loaded.metadata

    @property
    def network(self) -> keras.Model:
        """The Keras network (Grad-CAM needs its gradients); loaded, with TensorFlow, on first
        use.

        Raises:
            ModelFileError: The model was opened from an ``.onnx`` file with no matching
                ``.keras`` file beside it.
        """
        if self._network is None:
            if isinstance(self._loaded, LoadedModel):
                self._network = self._loaded.network
            elif self._keras_path is None:
                raise ModelFileError(
                    f"{self.path}: heatmaps need the Keras model this ONNX file was exported "
                    "from; load it with pneumoscan.load('MODEL.keras')"
                )
            else:
                self._network = load_model(self._keras_path).network
        return self._network

    def _parts(self, ood_check: bool) -> tuple[Scorer, OodDetector | None]:
        """The scorer and detector, built once per setting (Keras builds a feature model)."""
        from pneumoscan.inference.predict import load_detector, make_scorer  # lazy: loads SciPy

        if not self._detector_loaded:
            self._detector = load_detector(self._loaded)
            self._detector_loaded = True
        detector = self._detector if ood_check else None
        if ood_check not in self._scorers:
            self._scorers[ood_check] = make_scorer(self._loaded, detector, ood_check)
        return self._scorers[ood_check], detector

    def _results(
        self, inputs: Inputs, batch_size: int, ood_check: bool
    ) -> tuple[str, list[dict[str, Any]]]:
        """``(first column name, one result dict per input)`` through predict's own code."""
        from pneumoscan.inference.predict import expand_inputs, predict_files  # lazy: loads SciPy

        scorer, detector = self._parts(ood_check)
        paths, data = _split_inputs(inputs)
        if paths is not None:
            files, results = expand_inputs(paths)
            # Problems first, then files in order: the rows `pneumoscan predict` writes.
            results.extend(
                predict_files(
                    self._loaded, files, batch_size, ood_check=ood_check,
                    scorer=scorer, detector=detector,
                )
            )  # fmt: skip
            return "path", results
        return "index", list(self._predict_images(data, batch_size, scorer, detector, ood_check))

    def _predict_images(
        self,
        data: Sequence[bytes],
        batch_size: int,
        scorer: Scorer,
        detector: OodDetector | None,
        ood_check: bool,
    ) -> Iterator[dict[str, Any]]:
        from pneumoscan.inference.predict import error_result, predict_decoded  # lazy: loads SciPy

        for start in range(0, len(data), batch_size):
            items = _decode_all(data[start : start + batch_size], self._loaded, start)
            decoded = [item for item in items if isinstance(item, DecodedImage)]
            scored: Iterator[dict[str, Any]] = iter(())
            if decoded:
                scored = iter(predict_decoded(scorer, decoded, detector, ood_check))
            for offset, item in enumerate(items):
                index = start + offset
                if isinstance(item, DecodeFailure):
                    yield {"index": index} | error_result(f"image {index}", item.message)
                else:
                    yield {"index": index} | next(scored)

    def predict(
        self, inputs: Inputs, *, batch_size: int = 32, ood_check: bool = True
    ) -> Predictions:
        """One row per image: the values ``pneumoscan predict`` writes for it.

        Args:
            inputs: A file, a folder (every file under it), a list of paths, a PIL image, a
                uint8 array (H×W, H×W×3 or N×H×W×3; float in [0, 1] is converted), or a
                list of PIL images or arrays. Any size: images are resized like files.
            batch_size: Images decoded and scored at a time.
            ood_check: Reject images that do not look like frontal chest X-rays.

        Returns:
            A :class:`pandas.DataFrame` (:class:`Predictions`) with columns ``path``
            (``index`` for in-memory images), ``status`` (``ok``, ``rejected``: not a
            chest X-ray, ``error``: unreadable),
            ``probability`` (P(pneumonia), NaN unless ok), ``decision`` (NORMAL or
            PNEUMONIA at :attr:`threshold`), ``reason`` (why rejected or unreadable) and
            ``ood_score`` (above 1 is rejected; NaN when not computed).
            ``DataFrame.attrs`` holds ``model``, ``backend`` and ``threshold``.

        Raises:
            TypeError: An input of an unsupported type (the message lists the accepted ones).
            ValueError: No inputs, or an array whose shape or values are not an image.
        """
        first, results = self._results(inputs, batch_size, ood_check)
        rows = [
            {
                first: result[first],
                "status": result["status"],
                "probability": result.get("probability", np.nan),
                "decision": result.get("decision"),
                "reason": result.get("reason"),
                "ood_score": result.get("ood_score", np.nan),
            }
            for result in results
        ]
        table = Predictions(rows, columns=[first, *COLUMNS])
        table["probability"] = table["probability"].astype(float)
        table["ood_score"] = table["ood_score"].astype(float)
        table.attrs.update(model=self.name, backend=self.backend, threshold=self.threshold)
        return table

    def predict_proba(
        self, images: Inputs, *, batch_size: int = 32, ood_check: bool = False
    ) -> np.ndarray:
        """Class probabilities ``(n, 2)``, columns in :attr:`classes` order (scikit-learn).

        Every readable image is scored, X-ray or not (scikit-learn semantics); the values
        equal :meth:`predict`'s ``probability`` for the images it accepts. Use
        :meth:`predict` for triage: it also rejects images that are not chest X-rays.

        Args:
            images: As :meth:`predict` takes.
            batch_size: Images scored at a time.
            ood_check: Also run the out-of-distribution checks; rejected images get NaN.

        Raises:
            ImageReadError: An input could not be read (the message names it).
        """
        _, results = self._results(images, batch_size, ood_check)
        failed = [r for r in results if r["status"] == "error"]
        if failed:
            listed = "; ".join(str(r["reason"]) for r in failed[:3])
            raise ImageReadError(
                f"{len(failed)} of {len(results)} inputs could not be read ({listed}); "
                "Model.predict lists every unreadable file without raising"
            )
        positive = np.array([r.get("probability", np.nan) for r in results], dtype=np.float64)
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

        Loads the Keras network (and TensorFlow) on first use, whatever the scoring backend.

        Args:
            image: A file, a PIL image or one array (as :meth:`predict` takes).
            out: Also draw the titled overlay (as ``pneumoscan predict --heatmaps`` does)
                to this PNG file.
            class_name: The class whose evidence to show (default: the image's own decision,
                which needs the image to be accepted).

        Returns:
            ``(H, W)`` float32 map in [0, 1] at the model's input size.

        Raises:
            ValueError: More than one image, an unknown class, or (with no ``class_name``)
                an image that is rejected or unreadable.
            ModelFileError: No Keras network for this model.
        """
        # lazy: loads SciPy
        from pneumoscan.inference.predict import (
            display_at_original_aspect,
            expand_inputs,
            predict_batch,
        )

        paths, data = _split_inputs(image)
        if paths is not None:
            files, problems = expand_inputs(paths)
            if problems:
                raise ValueError(f"cannot draw a heatmap: {problems[0]['reason']}")
            paths = [Path(f) for f in files]
        if (paths is not None and len(paths) != 1) or (paths is None and len(data) != 1):
            raise ValueError("heatmap draws one image at a time; loop over the images")
        label = Path(paths[0]).name if paths is not None else "image"
        decoded = (
            try_decode_image(paths[0], self._loaded.preprocess)
            if paths is not None
            else _decode_all(data, self._loaded)[0]
        )
        if isinstance(decoded, DecodeFailure):
            raise ValueError(f"cannot draw a heatmap: {decoded.message}")
        scorer, detector = self._parts(True)
        result = predict_batch(
            scorer,
            decoded.pixels[None],
            [decoded.original_size],
            detector,
            True,
            decoded.display[None],
        )[0]
        if class_name is None:
            if result["status"] != "ok":
                raise ValueError(
                    f"{label}: {result['status']} ({result.get('reason')}); pass "
                    "class_name='PNEUMONIA' to draw the map anyway"
                )
            class_name = str(result["decision"])
        if class_name not in self.classes:
            raise ValueError(f"unknown class {class_name!r}; choose one of {self.classes}")
        cam = gradcam(
            self.network, decoded.pixels[None], class_index=self.classes.index(class_name)
        )
        heatmap = np.asarray(cam[0])
        if out is not None:
            if result["status"] == "ok":
                title = heatmap_title(label, result["probability"], result["decision"])
            else:
                title = f"{label}: evidence for {class_name} ({result['status']})"
            overlay_png(display_at_original_aspect(decoded), heatmap, title, Path(out))
        return heatmap


# --------------------------------------------------------------------------- functions


def _keras_source(model: PathLike | None) -> Path | None:
    """The ``.keras`` file a model's scores come from, when there is one (for heatmaps)."""

    if model is None or Path(model).suffix.lower() != ".onnx":
        return resolve_model_path(model)
    # MODEL.onnx and MODEL.int8.onnx are exported beside MODEL.keras.
    model = Path(model)
    candidate = model.with_suffix("").with_suffix(".keras")
    if candidate.is_file():
        from pneumoscan.inference.export import onnx_matches  # lazy: loads SciPy

        if onnx_matches(model, candidate):
            return candidate
    return None


def load(model: PathLike | None = None, backend: str = "auto") -> Model:
    """Open a model for prediction (default: the shipped one), as ``pneumoscan predict`` does.

    Args:
        model: A ``.keras`` file, a run folder, or an ``.onnx`` export (``None``: shipped).
        backend: ``auto`` (the ONNX export saved beside the model when there is one, as the
            shipped model has, else Keras), ``onnx`` (ONNX Runtime; exports to a temporary
            file if none is saved) or ``keras``. Only ``keras`` imports TensorFlow.

    Raises:
        ModelFileError: The file is missing or unreadable.
        ValueError: Unknown backend.
    """
    from pneumoscan.inference.backends import open_model  # lazy: loads SciPy

    loaded, network, note = open_model(model, backend)
    if note:
        warnings.warn(note, stacklevel=2)
    return Model(loaded, _keras_source(model), network)


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
    from pneumoscan.evaluate.scoring import (  # lazy: loads pandas
        image_scores,
        score_images,
        summarise,
    )

    chosen = model if isinstance(model, Model) else load(model)
    scored = score_images(data, chosen._loaded, split, batch_size)
    metrics = summarise(scored, n_resamples, seed) | {"scores": image_scores(scored)}
    # The CLI's --json leaves out the printed text report; so does this.
    result: dict[str, Any] = jsonable({k: v for k, v in metrics.items() if k != "report"})
    return result
