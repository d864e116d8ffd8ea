"""Settings of the service: limits, headers, the web page's folder, the intended-use text."""

from __future__ import annotations

import threading
from pathlib import Path

WEB_DIR = Path(__file__).resolve().parent / "web"
API_KEY_HEADER = "X-API-Key"
UPLOAD_FIELD = "files"
#: Images scored in one forward pass; batches are padded to powers of two, so keep it one.
DEFAULT_MAX_BATCH = 32
PREVIEW_MAX_SIDE = 512
INTENDED_USE = (
    "Triage support, not a diagnosis: estimates P(pneumonia) on pediatric frontal chest "
    "X-rays so that likely pneumonia is read first. Every image still needs a radiologist."
)
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
