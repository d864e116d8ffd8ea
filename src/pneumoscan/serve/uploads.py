"""Multipart uploads read into memory under size caps: nothing touches the disk.

Starlette's form parser (behind FastAPI's ``UploadFile``) spools every file part above 1 MB to
a temporary file. Uploaded X-rays are patient data, so this parser keeps each part in memory
and stops reading as soon as one file or the whole request passes its cap, before the excess
is buffered anywhere.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

MB = 1024 * 1024
DEFAULT_MAX_FILE_BYTES = 20 * MB
DEFAULT_MAX_REQUEST_BYTES = 100 * MB
DEFAULT_MAX_FILES = 50
#: Non-file form fields are ignored, but still bounded: a client could send a huge one.
MAX_FIELD_BYTES = 64 * 1024
#: Longest a request body may take to arrive: 100 MB at 2 MB/s. A client that trickles bytes
#: (one every 5 s) would otherwise hold a connection and its buffers for ever.
DEFAULT_BODY_SECONDS = 60.0
#: ``filename*=charset'language'percent-encoded`` (RFC 5987 / RFC 6266), which
#: python-multipart's header parser drops.
_EXTENDED_FILENAME = re.compile(rb"""(?:^|;)\s*filename\*\s*=\s*"?([^;"]*)"?""", re.IGNORECASE)


class UploadError(Exception):
    """An upload the server refuses as a whole; ``status_code`` is the HTTP answer.

    Attributes:
        status_code: 400 (malformed), 413 (too large or too many files) or 415 (not multipart).
        message: What went wrong, naming the file where one is at fault.
    """

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True)
class UploadLimits:
    """Caps on one request.

    Attributes:
        max_file_bytes: Largest accepted file.
        max_request_bytes: Largest accepted request body (all files and fields together).
        max_files: Most files in one request.
        body_seconds: Longest the whole request body may take to arrive.
    """

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_files: int = DEFAULT_MAX_FILES
    body_seconds: float = DEFAULT_BODY_SECONDS


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave it and its bytes."""

    filename: str
    data: bytes


def describe_size(n_bytes: int) -> str:
    """``20 MB`` or ``195 KB`` for messages (binary units, as the caps are set)."""
    if n_bytes >= MB:
        return f"{n_bytes / MB:.1f}".removesuffix(".0") + " MB"
    return f"{max(1, round(n_bytes / 1024))} KB"


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class _Collector:
    """python-multipart callbacks that gather the ``field`` parts in memory, under the caps."""

    def __init__(self, field_name: str, limits: UploadLimits) -> None:
        self.field_name = field_name
        self.limits = limits
        self.uploads: list[Upload] = []
        self.finished = False
        #: Names of the other form fields seen, for the message when no file arrived.
        self.other_fields: list[str] = []
        self._part = _Part()
        self._header_field = b""
        self._header_value = b""

    def callbacks(self) -> dict[str, object]:
        """The callback table :class:`MultipartParser` expects."""
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }

    def on_part_begin(self) -> None:
        self._part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        disposition = self._part.headers.get(b"content-disposition")
        if disposition is None:
            raise UploadError(400, "a multipart part has no Content-Disposition header")
        _, options = parse_options_header(disposition)
        self._part.name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = _extended_filename(disposition)
        if filename is None and b"filename" in options:
            filename = options[b"filename"].decode("utf-8", "replace")
        if filename is not None:
            # Browsers send the bare name; some clients send a path, whose folders say nothing.
            name = filename.replace("\\", "/").rsplit("/", 1)[-1]
            self._part.filename = name or "unnamed"
        if self._is_file() and len(self.uploads) >= self.limits.max_files:
            raise UploadError(413, f"too many files: at most {self.limits.max_files} per request")
        if not self._is_file():
            if self._part.filename is not None:
                # A file in another field is a client mistake, not an oversized field: say so
                # before its bytes arrive, whatever its size.
                raise UploadError(
                    400,
                    f"file {self._part.filename!r} was sent in the form field "
                    f"{self._part.name!r}; send files in the form field {self.field_name!r}",
                )
            self.other_fields.append(self._part.name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.size += end - start
        if self._is_file():
            if part.size > self.limits.max_file_bytes:
                raise UploadError(
                    413,
                    f"{part.filename or part.name}: larger than the "
                    f"{describe_size(self.limits.max_file_bytes)} limit per file",
                )
            part.chunks.append(data[start:end])
        elif part.size > MAX_FIELD_BYTES:
            raise UploadError(
                413,
                f"form field {part.name!r} is larger than the {describe_size(MAX_FIELD_BYTES)} "
                f"limit for fields other than {self.field_name!r} (send files in "
                f"{self.field_name!r})",
            )

    def on_part_end(self) -> None:
        if self._is_file():
            name = self._part.filename or f"file {len(self.uploads) + 1}"
            self.uploads.append(Upload(name, b"".join(self._part.chunks)))
        self._part = _Part()

    def on_end(self) -> None:
        self.finished = True

    def _is_file(self) -> bool:
        # Every part of the upload field counts as a file, with or without a file name.
        return self._part.name == self.field_name


def _extended_filename(disposition: bytes) -> str | None:
    """The RFC 5987 ``filename*`` of a Content-Disposition header, decoded; ``None`` when
    there is none or it cannot be decoded (the plain ``filename`` is used then). RFC 6266
    gives ``filename*`` precedence: clients send both, the plain one as an ASCII fallback."""
    match = _EXTENDED_FILENAME.search(disposition)
    if match is None:
        return None
    charset, _, rest = match.group(1).strip().partition(b"'")
    _language, quote, encoded = rest.partition(b"'")
    if not quote:
        return None
    try:
        return urllib.parse.unquote_to_bytes(encoded).decode(charset.decode("ascii") or "utf-8")
    except (LookupError, UnicodeDecodeError):
        return None


def _boundary(headers: Mapping[str, str]) -> bytes:
    content_type, options = parse_options_header(headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise UploadError(415, "send the files as multipart/form-data")
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "multipart/form-data without a boundary")
    return boundary


def _check_declared_length(headers: Mapping[str, str], limits: UploadLimits) -> None:
    """Refuse a body whose declared length is over the cap before reading any of it."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise UploadError(
            413,
            f"request of {describe_size(int(declared))} is larger than the "
            f"{describe_size(limits.max_request_bytes)} limit per request",
        )


async def _parse(
    stream: AsyncIterator[bytes], parser: MultipartParser, limits: UploadLimits
) -> None:
    received = 0
    async for chunk in stream:
        received += len(chunk)
        if received > limits.max_request_bytes:
            raise UploadError(
                413,
                f"request larger than the {describe_size(limits.max_request_bytes)} "
                "limit per request",
            )
        parser.write(chunk)
    parser.finalize()


async def read_uploads(
    headers: Mapping[str, str],
    stream: AsyncIterator[bytes],
    field_name: str = "files",
    limits: UploadLimits | None = None,
) -> list[Upload]:
    """Read the files of one form field from a multipart body, in upload order, in memory.

    Args:
        headers: The request headers (lower-case names, as Starlette gives them).
        stream: The request body, chunk by chunk (``request.stream()``).
        field_name: The form field holding the files.
        limits: Caps on the files and the request.

    Raises:
        UploadError: Not multipart (415), malformed (400), a file, the request or the file
            count over its cap (413), a body slower than ``limits.body_seconds`` (408), a
            client that disconnected (400). Reading stops at the first byte over a cap.
    """
    limits = limits or UploadLimits()
    boundary = _boundary(headers)
    _check_declared_length(headers, limits)
    collector = _Collector(field_name, limits)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(limits.body_seconds):
            await _parse(stream, parser, limits)
    except FormParserError as exc:
        raise UploadError(400, f"malformed multipart body ({exc})") from exc
    except TimeoutError as exc:
        raise UploadError(
            408,
            f"the request body did not arrive within {limits.body_seconds:g} s; "
            "the upload was too slow",
        ) from exc
    except ClientDisconnect as exc:
        # Answered (to no one) instead of an ASGI traceback in the log.
        raise UploadError(400, "the client disconnected during the upload") from exc
    if not collector.finished:
        raise UploadError(400, "incomplete multipart body (the upload was cut short?)")
    if not collector.uploads:
        seen = sorted(set(collector.other_fields))
        found = f" (the request has the fields {', '.join(map(repr, seen))})" if seen else ""
        raise UploadError(400, f"no files in the form field {field_name!r}{found}")
    return collector.uploads
