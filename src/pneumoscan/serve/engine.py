"""The model engine: one worker thread owns the model and scores queued images in batches."""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumoscan.constants import CLASSES
from pneumoscan.inference.explain import gradcam
from pneumoscan.inference.predictor import Predictor
from pneumoscan.serve.config import DEFAULT_MAX_BATCH
from pneumoscan.serve.schemas import Scored

if TYPE_CHECKING:
    from pneumoscan.data.preprocess import DecodedImage
    from pneumoscan.inference.prediction import Prediction


@dataclass
class _Job:
    images: list[DecodedImage]
    heatmap: bool
    future: Future[list[Scored]] = field(default_factory=Future)


class Engine:
    """A loaded model served by one worker thread that batches queued images.

    Args:
        predictor: The model, its detector, scorer and identity (the one composition root
            shared with ``pneumoscan predict`` and the Python API).
        max_batch: Most images per forward pass.
        heatmaps: Load the Keras network for Grad-CAM when the model has one (it never
            scores).
    """

    def __init__(
        self, predictor: Predictor, max_batch: int = DEFAULT_MAX_BATCH, heatmaps: bool = True
    ) -> None:
        self.predictor = predictor
        self.model = predictor.model
        self.network: Any = predictor.network if heatmaps and predictor.has_network else None
        self.detector = predictor.detector
        self.scorer = predictor.scorer()
        self.backend = predictor.backend
        self.max_batch = max_batch
        #: What each result records of the model (its file's hash, the pneumoscan version).
        self.identity = predictor.identity
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="pneumoscan-model", daemon=True)
        self._thread.start()

    @classmethod
    def load(
        cls,
        model_path: str | Path | None = None,
        backend: str = "auto",
        max_batch: int = DEFAULT_MAX_BATCH,
        warm_up: bool = True,
    ) -> Engine:
        """Open a model (default: the shipped one) as ``pneumoscan predict`` does
        (:meth:`Predictor.open <pneumoscan.inference.predictor.Predictor.open>`) and start its
        worker; the Keras network is loaded for heatmaps only.

        Raises:
            ModelFileError: The model cannot be read.
            InvalidInputError: Unknown backend.
        """
        engine = cls(Predictor.open(model_path, backend), max_batch)
        if warm_up:
            engine.warm_up()
        return engine

    @property
    def name(self) -> str:
        """The model file's name."""
        return self.model.name

    def warm_up(self) -> None:
        """Trace every padded batch size once, so no request pays for a trace.

        Called by :meth:`load` before any job is queued: the worker owns the network after.
        """
        height, width = self.model.preprocess.image_size
        size = 1
        while size <= self.max_batch:
            self.scorer.forward(np.zeros((size, height, width, 3), np.uint8))
            size *= 2

    def submit(self, images: list[DecodedImage], heatmap: bool) -> Future[list[Scored]]:
        """Queue decoded images; the future gives one :class:`Scored` per image, in order."""
        job = _Job(images, heatmap and self.network is not None)
        if not images:
            job.future.set_result([])
        else:
            self._queue.put(job)
        return job.future

    async def score(self, images: list[DecodedImage], heatmap: bool) -> list[Scored]:
        """:meth:`submit`, awaited without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(images, heatmap))

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, stop = self._gather(job)
            if jobs:
                self._run(jobs)
            if stop:
                return

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus whatever else is already queued, up to a full batch.

        Jobs whose request went away (their future was cancelled) are dropped; the others
        are marked running, so they can no longer be cancelled under the worker.

        Returns:
            ``(jobs, stop)``: ``stop`` when :meth:`close` was called meanwhile.
        """
        jobs: list[_Job] = []
        count, job = 0, first
        while True:
            if job.future.set_running_or_notify_cancel():
                jobs.append(job)
                count += len(job.images)
            if count >= self.max_batch:
                return jobs, False
            try:
                queued = self._queue.get_nowait()
            except queue.Empty:
                return jobs, False
            if queued is None:
                return jobs, True
            job = queued

    def _run(self, jobs: list[_Job]) -> None:
        try:
            scored = self._score([image for job in jobs for image in job.images], jobs)
        except Exception as exc:  # a model failure must not kill the worker
            for job in jobs:
                job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            job.future.set_result(scored[start : start + len(job.images)])
            start += len(job.images)

    def _score(self, images: list[DecodedImage], jobs: list[_Job]) -> list[Scored]:
        wants_map = [job.heatmap for job in jobs for _ in job.images]
        results: list[Prediction] = []
        for start in range(0, len(images), self.max_batch):
            results.extend(self.predictor.predict_decoded(images[start : start + self.max_batch]))
        chosen = [i for i, r in enumerate(results) if wants_map[i] and r.status == "ok"]
        maps = self._heatmaps([images[i] for i in chosen], [results[i] for i in chosen])
        scored = [Scored(result) for result in results]
        for i, heatmap in zip(chosen, maps, strict=True):
            scored[i].heatmap = heatmap
        return scored

    def _heatmaps(self, images: list[DecodedImage], results: list[Prediction]) -> list[Any]:
        """Grad-CAM maps of the evidence for each image's own decision."""

        maps: list[Any] = []
        for start in range(0, len(images), self.max_batch):
            chunk = slice(start, start + self.max_batch)
            classes = [CLASSES.index(str(r.decision)) for r in results[chunk]]
            pixels = np.stack([d.pixels for d in images[chunk]])
            maps.extend(gradcam(self.network, pixels, class_index=classes))
        return maps
