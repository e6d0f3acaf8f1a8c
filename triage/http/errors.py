"""The one place a domain error becomes an HTTP answer. JSON under the API, a page elsewhere (the sign-in
form for 401); the answer says what the user can fix and carries the request's id, never a server
path, object or traceback, which go to the log under that id.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from metadata.schema import SEXES, SITES
from triage.errors import Busy, Forbidden, Invalid, NotFound, NotSignedIn, Throttled, TooLarge, TriageError, Unavailable
from triage.schemas import REVIEW_OUTCOMES, ErrorOut

LOG = logging.getLogger("triage")
API = "/api/v1"
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).resolve().parents[1] / "templates"))
# Domain error -> HTTP status; a kind not listed is a 400.
STATUS: dict[type[Exception], int] = {
    NotFound: 404, Invalid: 422, TooLarge: 413, NotSignedIn: 401, Forbidden: 403, Throttled: 429, Busy: 503, Unavailable: 503,
}
UNAVAILABLE = "this is not available on the server right now; its administrator can find the details in the log under the request id."
INTERNAL = "the server failed to answer this request; its administrator can find the details in the log under the request id."


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


def page(request: Request, template: str, context: dict, status: int = 200) -> Response:
    """A server-rendered page (every page gets the vocabularies and the signed-in session, if any)."""
    identity = request.scope.get("state", {}).get("identity")
    base = {"sexes": SEXES, "sites": SITES, "outcomes": REVIEW_OUTCOMES, "who": getattr(identity, "actor", None),
            "csrf_token": getattr(getattr(identity, "session", None), "csrf_token", None), "request_id": request_id(request)}
    return TEMPLATES.TemplateResponse(request, template, {**base, **context}, status_code=status)


def error_answer(request: Request, error: Exception) -> Response:
    """The answer to an error: its status, a message safe to show, the request id."""
    status = next((code for kind, code in STATUS.items() if isinstance(error, kind)), 400 if isinstance(error, TriageError) else 500)
    message = str(error) if isinstance(error, TriageError) else UNAVAILABLE if isinstance(error, Unavailable) else INTERNAL
    if status >= 500 and not isinstance(error, Busy):
        LOG.error("request %s: %s %s failed: %s", request_id(request), request.method, request.url.path, error, exc_info=not isinstance(error, Unavailable))
    headers = {"Retry-After": str(error.retry_after)} if isinstance(error, Throttled) else None
    if request.url.path.startswith(API) or request.url.path == "/openapi.json":
        body = ErrorOut(detail=message, request_id=request_id(request), allowed=getattr(error, "allowed", None))
        return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)
    answer = page(request, "login.html" if status == 401 else "error.html", {"message": message}, status)
    answer.headers.update(headers or {})
    return answer


def _validation_message(error: RequestValidationError) -> str:
    """Which fields were refused and why, without echoing what was sent (it may be huge, or a patient's data)."""
    problems = [f"{'.'.join(str(part) for part in e['loc'] if part != 'body') or 'request'}: {e['msg']}" for e in error.errors()[:10]]
    return "; ".join(problems)


def add_error_handlers(app: FastAPI) -> None:
    """Domain errors, refused request fields (422) and HTTP errors of the framework (anything else is
    answered by `triage.http.middleware.RequestContext`, outside the framework's own 500 page)."""

    @app.exception_handler(TriageError)
    async def domain_error(request: Request, error: TriageError) -> Response:
        return error_answer(request, error)

    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, error: Unavailable) -> Response:
        return error_answer(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Response:
        return error_answer(request, Invalid(_validation_message(error)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        kind = {404: NotFound, 401: NotSignedIn, 413: TooLarge}.get(error.status_code)
        if kind is not None:
            return error_answer(request, kind("no such page or resource." if error.status_code == 404 else str(error.detail)))
        return JSONResponse(ErrorOut(detail=str(error.detail), request_id=request_id(request)).model_dump(exclude_none=True), status_code=error.status_code)
