"""Credentials and retrying, without a PACS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from pneumoscan.errors import InvalidInputError
from pneumoscan.interop.pacs import (
    CREDENTIALS_ENV,
    PASSWORD_ENV,
    TOKEN_ENV,
    USER_ENV,
    PacsError,
    RetryPolicy,
    pacs_session,
    with_retry,
)


def test_bearer_token_from_the_environment_wins() -> None:
    session = pacs_session(environ={TOKEN_ENV: "abc", USER_ENV: "u", PASSWORD_ENV: "p"})
    assert session.headers["Authorization"] == "Bearer abc" and session.auth is None


def test_no_compression_is_asked_for() -> None:
    assert pacs_session(environ={}).headers["Accept-Encoding"] == "identity"


def test_basic_credentials_from_the_environment() -> None:
    assert pacs_session(environ={USER_ENV: "u", PASSWORD_ENV: "p"}).auth == ("u", "p")
    assert pacs_session(environ={}).auth is None


def test_credentials_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "pacs.json"
    path.write_text(json.dumps({"username": "u", "password": "p"}))
    path.chmod(0o644)
    with pytest.raises(InvalidInputError, match="chmod 600"):
        pacs_session(path, environ={})
    path.chmod(0o600)
    assert pacs_session(environ={CREDENTIALS_ENV: str(path)}).auth == ("u", "p")
    path.write_text(json.dumps({"user": "u"}))
    with pytest.raises(InvalidInputError, match="token"):
        pacs_session(path, environ={})


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code, response.reason = status, "test"
    return requests.HTTPError(response=response)


def test_5xx_is_retried_with_growing_waits() -> None:
    answers: list[Exception | str] = [_http_error(503), _http_error(502), "stored"]
    waits: list[float] = []
    messages: list[str] = []

    def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    policy = RetryPolicy(attempts=5, first_wait=0.5)
    assert with_retry(call, "STOW-RS", policy, messages.append, waits.append) == "stored"
    assert waits == [0.5, 1.0]
    assert messages[0] == "STOW-RS: HTTP 503 test; retrying in 0.5 s"


def test_gives_up_after_its_attempts_and_never_retries_4xx() -> None:
    waits: list[float] = []

    def down() -> None:
        raise requests.ConnectionError("refused")

    with pytest.raises(PacsError, match="after 3 tries"):
        with_retry(down, "QIDO-RS", RetryPolicy(attempts=3), sleep=waits.append)
    assert waits == [1.0, 2.0]

    def forbidden() -> None:
        raise _http_error(403)

    with pytest.raises(PacsError, match="after 1 tries: HTTP 403"):
        with_retry(forbidden, "QIDO-RS", RetryPolicy(), sleep=waits.append)
    assert len(waits) == 2
