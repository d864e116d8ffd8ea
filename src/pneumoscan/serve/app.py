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

import base64
import hashlib
import hmac
import importlib.util
import logging
import re
import threading
import time
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles

from pneumoscan.constants import VERSION as __version__
from pneumoscan.data.preprocess import DecodeFailure
from pneumoscan.jsonio import jsonable
from pneumoscan.serve.config import API_KEY_HEADER, INTENDED_USE, UPLOAD_FIELD, WEB_DIR
from pneumoscan.serve.engine import Engine
from pneumoscan.serve.results import build_result, decode_upload
from pneumoscan.serve.schemas import FileResult, Health, ModelInfo, PredictResponse
from pneumoscan.serve.security import DrainUnreadBody, SecurityHeaders
from pneumoscan.serve.uploads import UploadError, UploadLimits, read_uploads

logger = logging.getLogger("pneumoscan.serve")


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
                state.engine.backend,
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
        identifiers: bool = Query(
            False,
            description="Give back each DICOM upload's study, series and SOP instance UIDs, "
            "accession number and patient id from its header (none by default; never for "
            "other formats).",
        ),
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
        return await _predict_uploads(engine, uploads, heatmap, image, started, identifiers)

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
    identifiers: bool = False,
) -> PredictResponse:
    model = engine.model
    decoded = await anyio.to_thread.run_sync(
        lambda: [decode_upload(u.data, u.filename, model) for u in uploads]
    )
    readable = [d for d in decoded if not isinstance(d, DecodeFailure)]
    try:
        scored_list = await engine.score(readable, heatmap)
    except Exception as exc:  # the model failed: each file says so, the worker lives on
        logger.error("scoring failed (%s)", type(exc).__name__)
        # Each file gives the failure as its reason, as an unreadable file gives its own.
        reason, kind = "internal error while scoring; see the server log", type(exc).__name__
        decoded = [DecodeFailure(u.filename, reason, kind) for u in uploads]
        scored_list = []
    scored = iter(scored_list)
    pairs = [(d, None if isinstance(d, DecodeFailure) else next(scored)) for d in decoded]

    def assemble() -> list[FileResult]:
        return [
            build_result(u.filename, d, s, engine.identity, image, identifiers)
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
    model = engine.model
    # The head reads the forward pass's pooled features: an export without them gives no
    # estimate, so the page and clients are not told to expect one.
    subtype = engine.scorer.subtype if engine.scorer.with_features else None
    validation = model.validation_metrics
    card = {
        "intended_use": INTENDED_USE,
        "architecture": model.arch,
        "training_data": model.training_data_root,
        "split": model.split_record.get("method"),
        "threshold_rule": model.operating_point.threshold_rule,
        "temperature": model.stored_temperature,
        "validation": {k: validation.get(k) for k in ("n", "auc", "sensitivity", "specificity")},
        "ood_check": (model.ood or {}).get("method"),
        "text": model.model_card,
    }
    return ModelInfo(
        name=engine.name,
        backend=engine.backend,
        model_sha256=engine.identity.model_sha256,
        pneumoscan_version=engine.identity.pneumoscan_version,
        arch=model.arch,
        classes=list(model.classes),
        threshold=engine.model.threshold,
        input_size=list(engine.model.preprocess.image_size),
        heatmaps=engine.network is not None,
        ood_detector=engine.detector is not None,
        subtype_head=subtype is not None,
        subtype_threshold=None if subtype is None else subtype.point.threshold,
        intended_use=INTENDED_USE,
        limits={
            "max_upload_bytes": limits.max_file_bytes,
            "max_request_bytes": limits.max_request_bytes,
            "max_files": limits.max_files,
        },
        model_card=card,
        metadata=jsonable(model.metadata),
    )


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
