"""Every client gets the service's answer: a real uvicorn server on 127.0.0.1, Python's urllib
(which sends the whole body before reading), and early 401/413 answers (issue 12)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import uvicorn

from pneumoscan.serve.app import API_KEY_HEADER, create_app

MB = 1024 * 1024
KEY = "sesame"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    # No request here reaches the model: a stand-in engine keeps the test fast.
    app = create_app(engine=SimpleNamespace(), api_key=KEY, max_upload_bytes=20 * MB)  # type: ignore[arg-type]
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _multipart(field: str, filename: str, size: int) -> tuple[bytes, str]:
    boundary = "pneumoscanboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
    ).encode()
    return head + b"\x00" * size + f"\r\n--{boundary}--\r\n".encode(), boundary


def _post(url: str, body: bytes, boundary: str, key: str | None) -> tuple[int, dict[str, object]]:
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if key is not None:
        headers[API_KEY_HEADER] = key
    request = urllib.request.Request(url + "/v1/predict", data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("megabytes", [25, 60])
def test_an_oversized_upload_gets_a_readable_413(base_url: str, megabytes: int) -> None:
    body, boundary = _multipart("files", "big.dcm", megabytes * MB)
    status, answer = _post(base_url, body, boundary, KEY)
    assert status == 413
    assert "big.dcm" in str(answer["detail"]) and "20 MB" in str(answer["detail"])


def test_an_upload_without_the_key_gets_a_readable_401(base_url: str) -> None:
    body, boundary = _multipart("files", "big.dcm", 25 * MB)
    status, answer = _post(base_url, body, boundary, None)
    assert status == 401 and API_KEY_HEADER in str(answer["detail"])


def test_a_file_in_the_wrong_field_is_a_400_naming_files(base_url: str) -> None:
    body, boundary = _multipart("file", "xray.jpeg", int(1.6 * MB))
    status, answer = _post(base_url, body, boundary, KEY)
    assert status == 400
    assert "'file'" in str(answer["detail"]) and "'files'" in str(answer["detail"])


def test_every_response_has_a_content_security_policy(base_url: str) -> None:
    for path in ("/docs", "/openapi.json", "/health", "/"):
        try:
            with urllib.request.urlopen(base_url + path, timeout=10) as response:
                headers = response.headers
        except urllib.error.HTTPError as error:
            headers = error.headers
        assert headers.get("content-security-policy"), path
    with urllib.request.urlopen(base_url + "/docs", timeout=10) as response:
        policy = response.headers["content-security-policy"]
    assert "'sha256-" in policy and "unsafe-eval" not in policy
