"""A real PACS for the tests: Orthanc with its DICOMweb plugin (Debian packages ``orthanc`` and
``orthanc-dicomweb``), on a free loopback port with a temporary configuration and storage
folder, and the field's own DICOM checkers (dcmtk's ``dsrdump``, dicom3tools' ``dciodvfy``).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import requests

ORTHANC = shutil.which("Orthanc")
_PLUGIN_PLACES = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*")),
)
DICOMWEB_PLUGIN = next((p for p in _PLUGIN_PLACES if p.exists()), None)
DSRDUMP = shutil.which("dsrdump")
DCIODVFY = shutil.which("dciodvfy")
#: The user the test PACS accepts (basic authentication, as a hospital's would ask).
USER, PASSWORD = "pneumoscan", "not-a-real-secret"

needs_orthanc = pytest.mark.skipif(
    ORTHANC is None or DICOMWEB_PLUGIN is None,
    reason="needs Orthanc and its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb; "
    ".ci/run installs them)",
)
needs_dicom_tools = pytest.mark.skipif(
    DSRDUMP is None or DCIODVFY is None,
    reason="needs dsrdump and dciodvfy (apt-get install dcmtk dicom3tools; .ci/run installs them)",
)


def free_port() -> int:
    """A TCP port nothing listens on now (loopback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def orthanc_server(folder: Path, timeout: float = 30.0) -> Iterator[str]:
    """Run Orthanc in ``folder`` until the block ends; yields its base URL."""
    assert ORTHANC is not None and DICOMWEB_PLUGIN is not None
    port = free_port()
    storage = folder / "storage"
    storage.mkdir(parents=True)
    config = {
        "Name": "pneumoscan-tests",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "HttpCompressionEnabled": False,
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    log = (folder / "orthanc.log").open("wb")
    process = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                text = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"Orthanc exited with status {process.returncode}:\n{text}")
            try:
                if requests.get(f"{base}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not answer on {base} within {timeout:.0f} s")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


class _Proxy(BaseHTTPRequestHandler):
    """Forwards every request to the PACS; answers 503 to the first ``lose`` POSTs after
    forwarding them (the PACS stored them, the answer was lost: the worst case for a retry)."""

    upstream = ""
    lose: ClassVar[list[int]] = [0]
    posts: ClassVar[list[int]] = [0]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body() if self.command in ("POST", "PUT") else None
        skip = {"host", "content-length", "transfer-encoding", "connection"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        answer = requests.request(
            self.command, self.upstream + self.path, headers=headers, data=body, timeout=30
        )
        if self.command == "POST":
            self.posts[0] += 1
            if self.lose[0] > 0:
                self.lose[0] -= 1
                answer.status_code, content, kind = 503, b"lost", "text/plain"
            else:
                content, kind = answer.content, answer.headers.get("Content-Type", "")
        else:
            content, kind = answer.content, answer.headers.get("Content-Type", "")
        self.send_response(answer.status_code)
        if kind:
            self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    do_GET = do_POST = do_PUT = do_DELETE = _forward


@contextmanager
def lossy_proxy(upstream: str, lose: int) -> Iterator[tuple[str, list[int]]]:
    """A proxy to ``upstream`` that loses the answers of the first ``lose`` POSTs; yields its
    base URL and the count of POSTs it forwarded."""
    handler = type("Proxy", (_Proxy,), {"upstream": upstream, "lose": [lose], "posts": [0]})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.posts
    finally:
        server.shutdown()
        server.server_close()
