"""ASGI middleware: security headers on every answer, unread request bodies drained."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from pneumoscan.serve.config import API_CSP, DRAIN_MAX_BYTES, DRAIN_SECONDS, PAGE_CSP

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
