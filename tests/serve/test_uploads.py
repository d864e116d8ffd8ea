"""Upload edges (issue 22): slow bodies, clients that go away, RFC 5987 file names."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from starlette.requests import ClientDisconnect

from pneumoscan.serve.uploads import UploadError, UploadLimits, read_uploads

BOUNDARY = "xyz"
HEADERS = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def _body(disposition: str, data: bytes = b"\x89PNG fake") -> bytes:
    return (
        (
            f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


async def _chunks(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def _read(stream: AsyncIterator[bytes], limits: UploadLimits | None = None) -> list[str]:
    uploads = asyncio.run(read_uploads(HEADERS, stream, "files", limits))
    return [u.filename for u in uploads]


@pytest.mark.parametrize(
    ("disposition", "name"),
    [
        # RFC 6266: filename* wins; the plain name is the ASCII fallback.
        ("""form-data; name="files"; filename="ete.png"; filename*=UTF-8''%C3%A9t%C3%A9.png""",
         "été.png"),
        ("form-data; name=\"files\"; filename*=UTF-8''r%C3%B6ntgen%20bild.dcm", "röntgen bild.dcm"),
        ("form-data; name=\"files\"; filename*=iso-8859-1'de'R%F6ntgen.png", "Röntgen.png"),
        ("form-data; name=\"files\"; filename*=UTF-8''..%2F..%2Fetc%2Fpasswd", "passwd"),
        # An undecodable extended name falls back to the plain one.
        ("""form-data; name="files"; filename="plain.png"; filename*=nope''%FF""", "plain.png"),
        ("form-data; name=\"files\"; filename=\"plain.png\"", "plain.png"),
    ],
)  # fmt: skip
def test_rfc_5987_file_names_are_honoured(disposition: str, name: str) -> None:
    assert _read(_chunks(_body(disposition))) == [name]


def test_a_body_that_trickles_in_is_cut_off() -> None:
    # Issue 22: a client sending one byte every 5 s was still connected at 90 s.
    async def trickle() -> AsyncIterator[bytes]:
        for byte in _body('form-data; name="files"; filename="a.png"'):
            yield bytes([byte])
            await asyncio.sleep(0.05)

    started = time.perf_counter()
    with pytest.raises(UploadError, match=r"did not arrive within 0\.3 s") as caught:
        _read(trickle(), UploadLimits(body_seconds=0.3))
    assert caught.value.status_code == 408
    assert time.perf_counter() - started < 1.0


def test_a_client_that_disconnects_mid_upload_is_an_upload_error() -> None:
    async def cut() -> AsyncIterator[bytes]:
        yield _body('form-data; name="files"; filename="a.png"')[:40]
        raise ClientDisconnect()

    with pytest.raises(UploadError, match="disconnected during the upload") as caught:
        _read(cut())
    assert caught.value.status_code == 400
