"""ASGI middleware, outermost first: a request id and a JSON access-log line for every request, protective
headers on every answer, the access gate (401 before a body is read), and the body limit.

Pure ASGI (no `BaseHTTPMiddleware`): they neither buffer bodies nor move handlers off the event loop.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from triage.errors import NotSignedIn, TooLarge

ACCESS_LOG = logging.getLogger("triage.access")
# Every answer: nothing cached (patient data on a shared computer), no type guessing, nothing framed,
# and a page may load only its own images and style sheet and post only to itself.
PROTECTIVE_HEADERS = {
    "cache-control": "no-store",
    "pragma": "no-cache",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # no-referrer would make a browser send `Origin: null` with its own forms
    "content-security-policy": "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
}


Answer = Callable[[Request, Exception], ASGIApp]  # the service's one error answer (triage.http.errors.error_answer)


class RequestContext:
    """Gives each request an id (`scope["state"]["request_id"]`, echoed as `X-Request-ID`), adds the
    protective headers, answers a failure no handler took (`answer`: a 500 that names the request id,
    never the error), logs one JSON line per request (id, method, path, status, milliseconds, who: the
    token label, once the gate knows it, and client) and tells `observe` (method, route template,
    status, seconds) for the metrics."""

    def __init__(self, app: ASGIApp, *, answer: Answer, observe: Callable[[str, str, int, float], None] | None = None) -> None:
        self.app, self.answer, self.observe = app, answer, observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(8)
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started, status, answered = time.perf_counter(), 500, False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
                headers = MutableHeaders(scope=message)
                for name, value in PROTECTIVE_HEADERS.items():
                    headers[name] = value
                headers["x-request-id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as error:
            if answered:  # the answer has begun: nothing left to tell the client
                raise
            await self.answer(Request(scope), error)(scope, receive, send_with_headers)
        finally:
            seconds = time.perf_counter() - started
            ACCESS_LOG.info(json.dumps({
                "request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                "ms": round(seconds * 1000, 1), "actor": state.get("actor"), "client": (scope.get("client") or ("-",))[0],
            }))
            if self.observe is not None:
                self.observe(scope["method"], getattr(scope.get("route"), "path", "unmatched"), status, seconds)


class BodyLimit:
    """413 for a request body over `max_bytes`, whether it says its length (answered at once) or is
    chunked (counted as it arrives: the handler reading it gets a 413)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, answer: Answer) -> None:
        self.app, self.max_bytes, self.answer = app, max_bytes, answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            too_large = TooLarge(f"a request of {int(declared)} bytes; at most {self.max_bytes}.")
            await self.answer(Request(scope), too_large)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # an HTTP error, which the framework's body parsing passes on (it turns others into 400)
                raise HTTPException(413, f"a request body over {self.max_bytes} bytes.")
            return message

        await self.app(scope, counted, send)


class AccessGate:
    """Who may reach what, decided before a body is read: `identify(request)` (run in a worker thread: it
    may ask the database) returns who the request is, or None; a request without one gets the answer
    to `NotSignedIn`, except on the open paths (probes, sign-in, the style sheet), whose bodies are
    held to `open_max_bytes`. Who it is goes to `scope["state"]["identity"]` (and the actor, for the log)."""

    def __init__(
        self, app: ASGIApp, *, identify: Callable[[Request], Any], answer: Answer, open_paths: tuple[str, ...], open_max_bytes: int,
    ) -> None:
        self.app, self.identify, self.answer, self.open_paths, self.open_max_bytes = app, identify, answer, open_paths, open_max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in self.open_paths:
            await BodyLimit(self.app, max_bytes=self.open_max_bytes, answer=self.answer)(scope, receive, send)
            return
        request = Request(scope)
        identity = await anyio.to_thread.run_sync(self.identify, request)
        if identity is None:
            await self.answer(request, NotSignedIn("a valid token is required: Authorization: Bearer TOKEN (pages: sign in at /login)."))(scope, receive, send)
            return
        scope["state"]["identity"], scope["state"]["actor"] = identity, identity.actor
        await self.app(scope, receive, send)
