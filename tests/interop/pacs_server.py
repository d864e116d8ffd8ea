"""A real PACS for the tests: Orthanc with its DICOMweb plugin (Debian packages ``orthanc`` and
``orthanc-dicomweb``), on a free loopback port with a temporary configuration and storage
folder, and the field's own DICOM checkers (dcmtk's ``dsrdump``, dicom3tools' ``dciodvfy``).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
