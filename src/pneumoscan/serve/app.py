"""The web service: a triage page for clinicians and a JSON API for other systems.

``create_app`` builds the FastAPI application without starting a server, so tests drive it with
``TestClient``; ``pneumoscan serve`` runs it on uvicorn. The model loads once, at start-up, in
the background (``/health`` says when it is ready), and one worker thread owns it: requests
decode their files in a thread pool, queue the decoded images, and the worker scores whatever
is queued in one batch (images of concurrent requests share a forward pass), so the event loop
stays free and the network is never used by two threads at once.

Privacy: uploads are parsed into memory (:mod:`pneumoscan.serve.uploads`), never written to disk;
the log holds counts and timings only (no file names, pixels or DICOM tags); responses are
marked ``no-store``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib.util
import io
import logging
import queue
import re
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field

from pneumoscan.constants import CLASSES, HEATMAP_MAX_SIDE
from pneumoscan.constants import VERSION as __version__
from pneumoscan.data.preprocess import decode_image
from pneumoscan.errors import ImageReadError
from pneumoscan.inference.explain import gradcam, heatmap_title, overlay_png
from pneumoscan.jsonio import jsonable
from pneumoscan.models.modelfile import resolve_model_path
from pneumoscan.serve.uploads import UploadError, UploadLimits, read_uploads

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from pneumoscan.data.preprocess import DecodedImage
    from pneumoscan.inference.ood import OodDetector
    from pneumoscan.inference.scorer import AnyModel, Scorer

logger = logging.getLogger("pneumoscan.serve")

WEB_DIR = Path(__file__).resolve().parent / "web"
API_KEY_ENV = "PNEUMOSCAN_API_KEY"
API_KEY_HEADER = "X-API-Key"
UPLOAD_FIELD = "files"
#: Images scored in one forward pass; batches are padded to powers of two, so keep it one.
DEFAULT_MAX_BATCH = 32
PREVIEW_MAX_SIDE = 512
INTENDED_USE = (
    "Triage support, not a diagnosis: estimates P(pneumonia) on pediatric frontal chest "
    "X-rays so that likely pneumonia is read first. Every image still needs a radiologist."
)
_UPLOAD_PLACEHOLDER = "<uploaded image>"
# Overlays are drawn one at a time: matplotlib's rendering holds the GIL, so parallel drawing
# gains nothing on CPU (measured), and a lock keeps the order fair and sidesteps its caveats
# about threads.
_RENDER_LOCK = threading.Lock()
# Content Security Policy of the page: everything from this server, nothing from elsewhere.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
#: Every other response (JSON, PNG...) may load and embed nothing.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
#: A request body not read when the answer is an early error (401, 413...) is read and
#: discarded up to this size and time, so that every client, including ones that send the
#: whole body before reading (Python's urllib), gets the answer instead of a reset connection.
DRAIN_MAX_BYTES = 256 * 1024 * 1024
DRAIN_SECONDS = 30.0


# --------------------------------------------------------------------------- response models


class FileResult(BaseModel):
    """The outcome for one uploaded file."""

    filename: str = Field(description="The file name the client sent.")
    status: Literal["ok", "rejected", "error"] = Field(
        description="ok: scored; rejected: not a frontal chest X-ray (not scored); "
        "error: not a readable image."
    )
    probability: float | None = Field(default=None, description="P(pneumonia), when ok.")
    decision: Literal["NORMAL", "PNEUMONIA"] | None = Field(
        default=None, description="PNEUMONIA when probability >= threshold, when ok."
    )
    threshold: float = Field(description="The model's operating threshold on P(pneumonia).")
    reason: str | None = Field(default=None, description="Why the file was rejected or not read.")
    ood_score: float | None = Field(
        default=None, description="Out-of-distribution score (above 1 is rejected), when computed."
    )
    format: str | None = Field(
        default=None, description="Format found from the content (JPEG, DICOM...)."
    )
    heatmap: str | None = Field(
        default=None,
        description="Grad-CAM overlay, base64 PNG (ok files, with ?heatmap=true, when the model "
        "has its Keras network: see heatmaps in /v1/model).",
    )
    image: str | None = Field(
        default=None,
        description="The decoded image, base64 PNG (readable files, with ?image=true).",
    )
    model_sha256: str | None = Field(
        default=None, description="SHA-256 of the model file that scored the file."
    )
    pneumoscan_version: str = Field(
        default=__version__, description="The pneumoscan version that produced the result."
    )
    scored_at: str | None = Field(
        default=None, description="When the result was made (UTC, ISO 8601)."
    )


class PredictResponse(BaseModel):
    """Results of one upload, one per file in upload order."""

    model: str
    results: list[FileResult]


class Health(BaseModel):
    """Liveness and readiness: HTTP 200 when ready, 503 while loading or after a failure."""

    live: bool
    ready: bool
    status: Literal["loading", "ready", "failed"]
    detail: str | None = None
    version: str


class ModelInfo(BaseModel):
    """The model being served, its card and its full metadata."""

    name: str
    backend: str
    arch: str | None
    classes: list[str]
    threshold: float
    input_size: list[int]
    heatmaps: bool
    ood_detector: bool
    intended_use: str
    limits: dict[str, int]
    model_card: dict[str, Any]
    metadata: dict[str, Any]


# --------------------------------------------------------------------------- model engine


@dataclass
class Scored:
    """One image's prediction result and, when asked and ok, its Grad-CAM map."""

    result: dict[str, Any]
    heatmap: np.ndarray | None = None


@dataclass
class _Job:
    images: list[DecodedImage]
    heatmap: bool
    future: Future[list[Scored]] = field(default_factory=Future)


class Engine:
    """A loaded model served by one worker thread that batches queued images.

    Args:
        model: Keras or ONNX Runtime model.
        network: The Keras network for Grad-CAM, or ``None`` (no heatmaps).
        detector: The model's out-of-distribution detector, or ``None`` (cheap checks only).
        scorer: The model on its backend (with the detector's features).
        backend: ``keras`` or ``onnx``.
        max_batch: Most images per forward pass.
    """

    def __init__(
        self,
        model: AnyModel,
        network: Any,
        detector: OodDetector | None,
        scorer: Scorer,
        backend: str,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.model = model
        self.network = network
        self.detector = detector
        self.scorer = scorer
        self.backend = backend
        self.max_batch = max_batch
        from pneumoscan.inference.predict import model_provenance  # lazy: loads SciPy

        #: What each result records of the model (its file's hash, the pneumoscan version).
        self.provenance = model_provenance(model)
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
        """Open a model (default: the shipped one) and start its worker.

        ``auto`` scores on the ONNX export saved beside the model when there is one, as
        ``pneumoscan predict`` does, so the page and the CLI give one answer per image; the
        Keras network is then loaded for heatmaps only.

        Raises:
            ModelFileError: The model cannot be read.
            ValueError: Unknown backend.
        """
        from pneumoscan.inference.backends import open_model, saved_export  # lazy: loads SciPy
        from pneumoscan.inference.predict import load_detector, make_scorer  # lazy: loads SciPy

        is_onnx = model_path is not None and Path(model_path).suffix.lower() == ".onnx"
        if backend == "auto":
            # open_model's auto picks Keras whenever a Keras network is asked for; the service
            # always wants one (heatmaps), so resolve auto here to score like predict does.
            has_export = not is_onnx and saved_export(resolve_model_path(model_path)) is not None
            backend = "onnx" if is_onnx or has_export else "keras"
        model, network, _ = open_model(model_path, backend, keras_network=not is_onnx)
        detector = load_detector(model)
        engine = cls(model, network, detector, make_scorer(model, detector), backend, max_batch)
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
        from pneumoscan.inference.predict import predict_batch  # lazy: loads SciPy

        wants_map = [job.heatmap for job in jobs for _ in job.images]
        results: list[dict[str, Any]] = []
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            results.extend(
                predict_batch(
                    self.scorer,
                    np.stack([d.pixels for d in chunk]),
                    [d.original_size for d in chunk],
                    self.detector,
                    True,
                    np.stack([d.display for d in chunk]),
                )
            )
        chosen = [i for i, r in enumerate(results) if wants_map[i] and r["status"] == "ok"]
        maps = self._heatmaps([images[i] for i in chosen], [results[i] for i in chosen])
        scored = [Scored(result) for result in results]
        for i, heatmap in zip(chosen, maps, strict=True):
            scored[i].heatmap = heatmap
        return scored

    def _heatmaps(self, images: list[DecodedImage], results: list[dict[str, Any]]) -> list[Any]:
        """Grad-CAM maps of the evidence for each image's own decision."""

        maps: list[Any] = []
        for start in range(0, len(images), self.max_batch):
            chunk = slice(start, start + self.max_batch)
            classes = [CLASSES.index(r["decision"]) for r in results[chunk]]
            pixels = np.stack([d.pixels for d in images[chunk]])
            maps.extend(gradcam(self.network, pixels, class_index=classes))
        return maps


# --------------------------------------------------------------------------- per-file work


def _reason(exc: Exception, filename: str) -> str:
    """The decoder's message, naming the file the client sent."""
    message = str(exc)
    if isinstance(exc, ImageReadError):
        return message.replace(_UPLOAD_PLACEHOLDER, filename)
    # decode_image turns every failure into an ImageReadError; should anything else get
    # here, name its kind only (its text might quote file content).
    return f"{filename}: the decoder failed on this file ({type(exc).__name__})"


def decode_upload(data: bytes, filename: str, model: AnyModel) -> DecodedImage | str:
    """Decode one upload for the model, or the reason it cannot be; never raises."""

    try:
        return decode_image(data, model.preprocess)
    except Exception as exc:  # every failure becomes a per-file reason, never a 500
        return _reason(exc, filename)


def png_base64(pixels: np.ndarray) -> str:
    """Base64 PNG of a uint8 image (stored as grey when the channels are equal)."""
    image = Image.fromarray(pixels)
    grey = pixels.ndim == 3 and all(np.array_equal(pixels[..., 0], pixels[..., c]) for c in (1, 2))
    if grey:
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heatmap_base64(
    decoded: DecodedImage, heatmap: np.ndarray, filename: str, result: dict[str, Any]
) -> str:
    """Base64 PNG of the Grad-CAM overlay, drawn like ``pneumoscan predict --heatmaps``."""
    from pneumoscan.inference.predict import display_at_original_aspect  # lazy: loads SciPy

    title = heatmap_title(filename, result["probability"], result["decision"])
    picture = display_at_original_aspect(decoded, HEATMAP_MAX_SIDE)
    with _RENDER_LOCK:
        data = overlay_png(picture, heatmap, title, max_side=HEATMAP_MAX_SIDE)
    return base64.b64encode(data).decode("ascii")


def _picture(draw: Callable[[], str], what: str) -> str | None:
    """A picture for the result, or ``None`` if drawing it failed (the result still stands)."""
    try:
        return draw()
    except Exception as exc:  # a drawing failure must not turn the whole request into a 500
        logger.error("drawing the %s failed (%s)", what, type(exc).__name__)
        return None


def build_result(
    filename: str,
    decoded: DecodedImage | str,
    scored: Scored | None,
    threshold: float,
    with_image: bool,
    provenance: dict[str, Any] | None = None,
) -> FileResult:
    """The API's result for one file from its decoding and scoring.

    ``provenance`` (:func:`pneumoscan.inference.predict.model_provenance`) gives the model's hash;
    the
    result also records the pneumoscan version and when it was made.
    """
    from pneumoscan.inference.predict import display_at_original_aspect, stamp  # lazy: loads SciPy

    recorded = stamp({}, provenance or {"pneumoscan_version": __version__})
    if isinstance(decoded, str) or scored is None:
        reason = decoded if isinstance(decoded, str) else f"{filename}: not scored"
        return FileResult(
            filename=filename, status="error", threshold=threshold, reason=reason, **recorded
        )
    result = scored.result
    cam = scored.heatmap
    heatmap = None
    if cam is not None:
        heatmap = _picture(lambda: heatmap_base64(decoded, cam, filename, result), "heatmap")
    image = None
    if with_image:
        image = _picture(
            lambda: png_base64(display_at_original_aspect(decoded, PREVIEW_MAX_SIDE)), "image"
        )
    return FileResult(
        filename=filename,
        status=result["status"],
        probability=result.get("probability"),
        decision=result.get("decision"),
        threshold=threshold,
        reason=result.get("reason"),
        ood_score=result.get("ood_score"),
        format=decoded.source_format,
        heatmap=heatmap,
        image=image,
        **recorded,
    )


# --------------------------------------------------------------------------- service state


@dataclass
class ServiceState:
    """What the routes share: the engine once loaded, or why it failed, and the settings."""

    limits: UploadLimits
    api_key: str | None
    engine: Engine | None = None
    error: str | None = None
    owns_engine: bool = True

    def require_engine(self) -> Engine:
        """The engine, or a 503 while it loads or after it failed."""
        if self.engine is None:
            detail = self.error or "the model is still loading; retry shortly"
            raise HTTPException(503, detail=detail, headers={"Retry-After": "5"})
        return self.engine


def _load_in_background(
    state: ServiceState, model_path: str | Path | None, backend: str
) -> threading.Thread:
    def load() -> None:
        started = time.perf_counter()
        try:
            state.engine = Engine.load(model_path, backend)
        except Exception as exc:  # reported by /health; the server stays up to say so
            state.error = f"model failed to load: {exc}"
            logger.error("%s", state.error)  # about the model file: no patient data
        else:
            logger.info(
                "model %s ready on %s in %.1f s",
                state.engine.name,
                backend,
                time.perf_counter() - started,
            )

    thread = threading.Thread(target=load, name="pneumoscan-load", daemon=True)
    thread.start()
    return thread


def _silence_patient_data_logging() -> None:
    """Keep DICOM readers from logging or warning with tag values (names, IDs, dates)."""
    dicom_logger = logging.getLogger("pydicom")
    dicom_logger.setLevel(logging.CRITICAL + 1)
    dicom_logger.propagate = False
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?$")
    if importlib.util.find_spec("pydicom") is not None:
        from pydicom import config  # lazy: loads pydicom

        # Value validation warns with the offending value ("Invalid value for VR PN: ...").
        config.settings.reading_validation_mode = config.IGNORE


# --------------------------------------------------------------------------- middleware


class SecurityHeaders:
    """Add no-store, no-sniff and no-referrer headers (and the page's CSP) to responses.

    Pure ASGI, so request bodies keep streaming to the upload parser untouched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                if path.startswith("/v1/"):
                    # Results describe patients: no cache may keep them.
                    headers.append((b"cache-control", b"no-store"))
                if not any(name.lower() == b"content-security-policy" for name, _ in headers):
                    # Routes with inline scripts (/docs) set their own policy.
                    page = path == "/" or path.startswith("/static/")
                    headers.append(
                        (b"content-security-policy", (PAGE_CSP if page else API_CSP).encode())
                    )
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class DrainUnreadBody:
    """Read and discard what remains of a request body before an early answer is sent.

    An answer given before the body is read (401 from the key check, 413 at the first byte
    over a cap) would otherwise be followed by closing a connection the client is still
    writing to: clients that read only after sending (Python's urllib, many scripts) then
    see "connection reset" or "broken pipe" instead of the answer. At most
    :data:`DRAIN_MAX_BYTES` are discarded, within :data:`DRAIN_SECONDS`; a larger declared
    body is not drained. A client that sent ``Expect: 100-continue`` and got no
    ``100 Continue`` has sent no body, so its answer goes out at once.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int = DRAIN_MAX_BYTES, seconds: float = DRAIN_SECONDS
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        declared = headers.get(b"content-length", b"")
        too_long = declared.isdigit() and int(declared) > self.max_bytes
        waits_for_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        seen = {"started": False, "ended": False}

        async def tracking_receive() -> Message:
            message = await receive()
            seen["started"] = True
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                seen["ended"] = True
            return message

        async def drain() -> None:
            discarded = 0
            with anyio.move_on_after(self.seconds):
                while not seen["ended"] and discarded <= self.max_bytes:
                    discarded += len((await tracking_receive()).get("body", b""))

        async def send_after_draining(message: Message) -> None:
            early = message["type"] == "http.response.start" and not seen["ended"]
            # Nothing was asked of a client waiting for 100 Continue: it has sent no body.
            no_body_sent = waits_for_continue and not seen["started"]
            if early and not too_long and not no_body_sent:
                await drain()
            await send(message)

        await self.app(scope, tracking_receive, send_after_draining)


# --------------------------------------------------------------------------- routes


def _state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.service
    return state


_api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)


def require_api_key(request: Request, supplied: str | None = Depends(_api_key_header)) -> None:
    """Refuse ``/v1/*`` without the configured key (401); no key configured: open."""
    expected = _state(request).api_key
    if expected is None:
        return
    if supplied is None or not hmac.compare_digest(supplied.encode(), expected.encode()):
        raise HTTPException(401, detail=f"missing or incorrect API key (header {API_KEY_HEADER})")


_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [UPLOAD_FIELD],
                    "properties": {
                        UPLOAD_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "X-rays in any format (JPEG, PNG, TIFF, DICOM...): "
                            "found from the content, not the file name.",
                        }
                    },
                }
            }
        },
    }
}


def _api_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["v1"])

    @router.post(
        "/predict",
        response_model=PredictResponse,
        openapi_extra=_UPLOAD_SCHEMA,
        responses={
            400: {"description": "Malformed upload or no files."},
            401: {"description": "Missing or incorrect API key."},
            413: {"description": "A file, the request or the file count is over its cap."},
            415: {"description": "Not multipart/form-data."},
            503: {"description": "The model is still loading, or failed to load."},
        },
    )
    async def predict(
        request: Request,
        heatmap: bool = Query(False, description="Add a Grad-CAM overlay to each ok result."),
        image: bool = Query(False, description="Add the decoded image (as PNG) to each result."),
    ) -> PredictResponse:
        """Score uploaded X-rays: one result per file, in upload order.

        Files that are not images get status ``error``, images that are not frontal chest
        X-rays ``rejected``, each with a reason; neither fails the request.
        """
        state = _state(request)
        engine = state.require_engine()
        started = time.perf_counter()
        try:
            uploads = await read_uploads(
                request.headers, request.stream(), UPLOAD_FIELD, state.limits
            )
        except UploadError as exc:
            raise HTTPException(exc.status_code, detail=exc.message) from exc
        return await _predict_uploads(engine, uploads, heatmap, image, started)

    @router.get("/model", response_model=ModelInfo)
    async def model_info(request: Request) -> ModelInfo:
        """The model being served: name, threshold, limits, model card and metadata."""
        state = _state(request)
        return describe_model(state.require_engine(), state.limits)

    return router


async def _predict_uploads(
    engine: Engine,
    uploads: Sequence[Any],
    heatmap: bool,
    image: bool,
    started: float,
) -> PredictResponse:
    model = engine.model
    decoded = await anyio.to_thread.run_sync(
        lambda: [decode_upload(u.data, u.filename, model) for u in uploads]
    )
    readable = [d for d in decoded if not isinstance(d, str)]
    try:
        scored_list = await engine.score(readable, heatmap)
    except Exception as exc:  # the model failed: each file says so, the worker lives on
        logger.error("scoring failed (%s)", type(exc).__name__)
        decoded = ["internal error while scoring; see the server log"] * len(decoded)
        scored_list = []
    scored = iter(scored_list)
    pairs = [(d, None if isinstance(d, str) else next(scored)) for d in decoded]

    def assemble() -> list[FileResult]:
        return [
            build_result(u.filename, d, s, model.threshold, image, engine.provenance)
            for u, (d, s) in zip(uploads, pairs, strict=True)
        ]

    results = await anyio.to_thread.run_sync(assemble)
    counts = {
        status: sum(r.status == status for r in results) for status in ("ok", "rejected", "error")
    }
    # Counts and timings only: file names, pixels and DICOM tags stay out of the log.
    logger.info(
        "predict: %d files (%d ok, %d rejected, %d error), heatmap=%s, %.0f ms",
        len(results),
        counts["ok"],
        counts["rejected"],
        counts["error"],
        heatmap,
        (time.perf_counter() - started) * 1000,
    )
    return PredictResponse(model=engine.name, results=results)


def describe_model(engine: Engine, limits: UploadLimits) -> ModelInfo:
    """``GET /v1/model``'s answer from the loaded model's metadata."""
    metadata = engine.model.metadata
    validation = metadata.get("validation_metrics", {})
    card = {
        "intended_use": INTENDED_USE,
        "architecture": metadata.get("arch"),
        "training_data": metadata.get("data", {}).get("root"),
        "split": metadata.get("data", {}).get("split", {}).get("method"),
        "threshold_rule": engine.model.operating_point.threshold_rule,
        "temperature": metadata.get("temperature"),
        "validation": {k: validation.get(k) for k in ("n", "auc", "sensitivity", "specificity")},
        "ood_check": metadata.get("ood", {}).get("method") if metadata.get("ood") else None,
        "text": metadata.get("model_card"),
    }
    return ModelInfo(
        name=engine.name,
        backend=engine.backend,
        arch=metadata.get("arch"),
        classes=list(metadata.get("classes", CLASSES)),
        threshold=engine.model.threshold,
        input_size=list(engine.model.preprocess.image_size),
        heatmaps=engine.network is not None,
        ood_detector=engine.detector is not None,
        intended_use=INTENDED_USE,
        limits={
            "max_upload_bytes": limits.max_file_bytes,
            "max_request_bytes": limits.max_request_bytes,
            "max_files": limits.max_files,
        },
        model_card=card,
        metadata=_jsonable(metadata),
    )


def _jsonable(value: Any) -> Any:

    return jsonable(value)


def _docs_assets() -> Path | None:
    """Swagger UI's files as shipped by the fastapi-offline package (no CDN)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _add_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI served from this app's own files."""
    assets = _docs_assets()
    if assets is None:
        logger.warning("fastapi-offline is not installed: /docs is unavailable")
        return
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return _with_script_hashes(
            get_swagger_ui_html(
                openapi_url="/openapi.json",
                title="pneumoscan API",
                swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                swagger_css_url="/docs-assets/swagger-ui.css",
                swagger_favicon_url="/docs-assets/favicon.png",
                # The validator badge would call an external service.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )


def _with_script_hashes(response: HTMLResponse) -> HTMLResponse:
    """The page with a CSP that allows its own files and exactly its inline scripts (Swagger
    UI starts from one), by hash: no other script can run."""
    html = bytes(response.body).decode("utf-8")
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", html, re.DOTALL)
    )
    # Swagger UI sets style attributes from its scripts, hence the inline styles.
    policy = (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    )
    response.headers["content-security-policy"] = policy
    return response


def _add_page_and_health(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get(
        "/health",
        response_model=Health,
        responses={503: {"model": Health, "description": "Alive but not ready."}},
        tags=["health"],
    )
    async def health(request: Request) -> JSONResponse:
        """Liveness and readiness: 200 once the model is loaded, 503 before or on failure."""
        state = _state(request)
        status: Literal["loading", "ready", "failed"] = "loading"
        if state.engine is not None:
            status = "ready"
        elif state.error is not None:
            status = "failed"
        body = Health(
            live=True,
            ready=status == "ready",
            status=status,
            detail=state.error,
            version=__version__,
        )
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


def create_app(
    model_path: str | Path | None = None,
    api_key: str | None = None,
    max_upload_bytes: int = UploadLimits.max_file_bytes,
    max_request_bytes: int = UploadLimits.max_request_bytes,
    max_files: int = UploadLimits.max_files,
    backend: str = "auto",
    engine: Engine | None = None,
) -> FastAPI:
    """Build the service; the model loads in the background when the app starts.

    Args:
        model_path: Model file, run folder or ``.onnx`` file (default: the shipped model).
        api_key: Key required in the ``X-API-Key`` header on ``/v1/*`` (``None``: open).
        max_upload_bytes: Largest accepted file (larger: 413).
        max_request_bytes: Largest accepted request body (larger: 413).
        max_files: Most files per request (more: 413).
        backend: ``auto`` (the saved ONNX export when there is one, as ``pneumoscan predict``
            does; Keras for heatmaps only), ``keras`` or ``onnx``.
        engine: An already loaded engine to serve (it is not closed with the app), e.g. to
            share one model between test apps.
    """
    _silence_patient_data_logging()
    limits = UploadLimits(max_upload_bytes, max(max_request_bytes, max_upload_bytes), max_files)
    state = ServiceState(limits=limits, api_key=api_key or None)
    if engine is not None:
        state.engine, state.owns_engine = engine, False

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.engine is None and state.error is None:
            _load_in_background(state, model_path, backend)
        yield
        if state.owns_engine and state.engine is not None:
            state.engine.close()

    app = FastAPI(
        title="pneumoscan",
        version=__version__,
        description=INTENDED_USE,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = state
    app.include_router(_api_router())
    _add_page_and_health(app)
    _add_docs(app)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(DrainUnreadBody)
    return app
