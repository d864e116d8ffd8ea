"""The one composition root of prediction: a model file opened once, with its detector,
scorers, identity and (for heatmaps) its Keras network.

``pneumoscan predict``, the Python API (:func:`pneumoscan.load`), the web service, ``evaluate``,
``report`` and ``audit-model`` all open their model through :meth:`Predictor.open`, so they
score on the same backend and file and record the same identity. Heatmaps never change the
scoring backend: Grad-CAM uses the Keras network of the ``.keras`` file the scoring file came
from, loaded on first use.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoscan.constants import DEFAULT_WORKERS
from pneumoscan.data.pipeline import DEFAULT_PREFETCH
from pneumoscan.data.preprocess import DecodedImage
from pneumoscan.errors import ModelFileError
from pneumoscan.inference.backends import keras_source, open_model
from pneumoscan.inference.ood import OodDetector
from pneumoscan.inference.predict import (
    Entry,
    Problem,
    check_batching,
    displays,
    load_detector,
    make_scorer,
    model_identity,
    predict_batch,
    predict_files,
    with_dicom_headers,
)
from pneumoscan.inference.prediction import ModelIdentity, Prediction
from pneumoscan.inference.scorer import AnyModel, Scorer
from pneumoscan.models.modelfile import LoadedModel, load_model, now_utc

if TYPE_CHECKING:
    import keras


class Predictor:
    """A model ready to predict: scoring file, OOD detector, scorers, identity.

    Make one with :meth:`open`. It is cheap to keep and reuse; the Keras network for
    heatmaps is loaded only when first asked for (:attr:`network`).

    Args:
        model: The scoring model (Keras or ONNX Runtime).
        keras_path: The ``.keras`` file the model came from (for heatmaps), if known.
        network: An already loaded Keras network for heatmaps.
        note: What the user should know about how the model was opened (a temporary export).
    """

    def __init__(
        self,
        model: AnyModel,
        keras_path: Path | None = None,
        network: keras.Model | None = None,
        note: str | None = None,
    ) -> None:
        self.model = model
        self.keras_path = keras_path
        self._network = network
        self.note = note
        self.detector: OodDetector | None = load_detector(model)
        self.identity: ModelIdentity = model_identity(model)
        self._scorers: dict[bool, Scorer] = {}

    @classmethod
    def open(
        cls,
        model: str | Path | None = None,
        backend: str = "auto",
        onnx_path: str | Path | None = None,
    ) -> Predictor:
        """Open a model for prediction (:func:`pneumoscan.inference.backends.open_model`).

        Args:
            model: A ``.keras`` file, a run folder or an ``.onnx`` export (default: shipped).
            backend: ``auto`` (the saved ONNX export beside the model when there is one, as
                the shipped model has; else Keras), ``keras`` or ``onnx``.
            onnx_path: An exported ONNX file to score with (``backend="onnx"``).

        Raises:
            ModelFileError: The file is missing or unreadable.
            InvalidInputError: Unknown backend.
        """
        loaded, network, note = open_model(model, backend, onnx_path)
        return cls(loaded, keras_source(model, loaded), network, note)

    @property
    def backend(self) -> str:
        """``onnx`` or ``keras``: what scores."""
        return self.identity.backend

    @property
    def name(self) -> str:
        """The scoring file's name."""
        return self.model.name

    @property
    def threshold(self) -> float:
        """The operating threshold on P(pneumonia)."""
        return self.model.threshold

    @property
    def has_network(self) -> bool:
        """Whether heatmaps can be drawn (a Keras network is loaded or can be)."""
        return self._network is not None or self.keras_path is not None

    @property
    def network(self) -> keras.Model:
        """The Keras network for Grad-CAM, loaded (with TensorFlow) on first use; it never
        scores.

        Raises:
            ModelFileError: No ``.keras`` file is known for this model.
        """
        if self._network is None:
            if isinstance(self.model, LoadedModel):
                self._network = self.model.network
            elif self.keras_path is None:
                raise ModelFileError(
                    f"{self.model.path}: heatmaps need the Keras model this ONNX file was "
                    "exported from (MODEL.keras beside it, or give --model MODEL.keras)"
                )
            else:
                self._network = load_model(self.keras_path).network
        return self._network

    def scorer(self, ood_check: bool = True) -> Scorer:
        """The model on its backend, with the detector's features when they are needed
        (built once per setting: Keras builds a feature model)."""
        if ood_check not in self._scorers:
            self._scorers[ood_check] = make_scorer(self.model, self.detector, ood_check)
        return self._scorers[ood_check]

    def predict_batch(
        self,
        pixels: np.ndarray,
        sizes: Sequence[tuple[int, int]] | np.ndarray | None = None,
        display: np.ndarray | None = None,
        *,
        ood_check: bool = True,
        names: Sequence[str] | None = None,
    ) -> list[Prediction]:
        """Predictions for a batch of decoded images, in order, with the model's identity
        (:func:`pneumoscan.inference.predict.predict_batch`).

        Args:
            pixels: ``(n, H, W, 3)`` uint8 model input.
            sizes: ``(width, height)`` of each original image.
            display: The images before intensity normalisation, if the model uses one.
            ood_check: Run the out-of-distribution checks.
            names: What each prediction's ``path`` says (default: empty).
        """
        detector = self.detector if ood_check else None
        results = predict_batch(self.scorer(ood_check), pixels, sizes, detector, ood_check, display)
        now = now_utc()
        labels = list(names) if names is not None else [""] * len(results)
        return [
            result.replace(path=label).traced(self.identity, now)
            for result, label in zip(results, labels, strict=True)
        ]

    def predict_decoded(
        self,
        decoded: Sequence[DecodedImage],
        names: Sequence[str] | None = None,
        *,
        ood_check: bool = True,
    ) -> list[Prediction]:
        """:meth:`predict_batch` on decoded images (pixels, original sizes, displays); a
        DICOM image the series rules refuse is rejected unscored, and a DICOM image's
        prediction carries its identifiers
        (:func:`pneumoscan.inference.predict.with_dicom_headers`)."""
        if not decoded:
            return []

        def score(fit: Sequence[DecodedImage]) -> list[Prediction]:
            return predict_batch(
                self.scorer(ood_check),
                np.stack([d.pixels for d in fit]),
                [d.original_size for d in fit],
                self.detector if ood_check else None,
                ood_check,
                displays(fit),
            )

        now = now_utc()
        labels = list(names) if names is not None else [""] * len(decoded)
        results = with_dicom_headers(decoded, score, self.threshold)
        return [
            result.replace(path=label).traced(self.identity, now)
            for result, label in zip(results, labels, strict=True)
        ]

    def predict_files(
        self,
        files: Sequence[str],
        batch_size: int = 32,
        *,
        ood_check: bool = True,
        heatmaps: str | Path | None = None,
        workers: int = DEFAULT_WORKERS,
        prefetch: int = DEFAULT_PREFETCH,
    ) -> Iterator[Prediction]:
        """One prediction per file, in order, streamed as batches finish
        (:func:`pneumoscan.inference.predict.predict_files`)."""
        check_batching(batch_size, workers)
        return predict_files(
            self.model, files, batch_size, ood_check=ood_check, heatmaps=heatmaps,
            heatmap_network=self.network if heatmaps is not None else None, workers=workers,
            prefetch=prefetch, scorer=self.scorer(ood_check),
            detector=self.detector if ood_check else None, identity=self.identity,
        )  # fmt: skip

    def predict_entries(
        self, entries: Sequence[Entry], batch_size: int = 32, **options: Any
    ) -> Iterator[Prediction]:
        """One prediction per entry of :func:`pneumoscan.inference.predict.list_inputs`, in
        the entries' order: problems become error predictions where they stand, files are
        scored in batches (``options`` as :meth:`predict_files` takes them)."""
        check_batching(batch_size, int(options.get("workers", DEFAULT_WORKERS)))
        files = [entry for entry in entries if isinstance(entry, str)]
        scored = self.predict_files(files, batch_size, **options) if files else iter(())
        for entry in entries:
            if isinstance(entry, Problem):
                failed = Prediction.failed(entry.path, entry.message)
                yield failed.traced(self.identity, now_utc())
            else:
                yield next(scored)

    def describe(self) -> dict[str, Any]:
        """The model's identity as JSON values (for results files and reports)."""
        identity = self.identity
        return {
            "name": identity.name,
            "path": identity.path,
            "backend": identity.backend,
            "threshold": identity.threshold,
            "model_sha256": identity.model_sha256,
            "pneumoscan_version": identity.pneumoscan_version,
        }
