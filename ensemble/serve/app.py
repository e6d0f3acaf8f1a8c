"""The triage service over HTTP: a versioned JSON API, server-rendered pages, token access.

    create_app(service, tokens={"secret": "dr-lee"}) -> a FastAPI app (run it with uvicorn)

API under /api/v1 (OpenAPI schema at /openapi.json, readable offline at /docs); pages at /,
/patients/{id} and /worklist, plain HTML with no script, CDN or build step. With tokens, every API
call needs `Authorization: Bearer TOKEN` and every page (the API docs too) the cookie `/login` sets,
an HMAC of the token rather than the token itself; a wrong or missing token gets 401. /healthz and
/readyz stay open for load balancers' probes. Each token has a label, recorded with every upload, score and review it causes.
Scoring runs in FastAPI's thread pool (the handlers are plain functions), never on the event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path
from typing import Annotated, Awaitable, Callable
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi import Path as PathParameter
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ensemble.serve.triage import REVIEW_OUTCOMES, NotFound, StoreUnavailable, TriageService, UploadError
from errors import OptionError
from metadata.schema import SEXES, SITES

API = "/api/v1"
TOKEN_COOKIE = "triage_token"
LABEL = re.compile(r"[A-Za-z0-9._-]+")
MAX_LABEL = 64  # characters: the audit columns' width
OPEN_PATHS = ("/healthz", "/readyz", "/login")  # probes for the proxy, and the sign-in form
OPEN_MAX_BYTES = 64 * 1024  # the body an unauthenticated request may send (a sign-in form)
LesionId = Annotated[int, PathParameter(ge=1, le=2**31 - 1)]  # a database integer key
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


class ReviewIn(BaseModel):
    outcome: str
    note: str = ""
    score_id: int | None = None  # the score the reviewer saw (default: the lesion's latest)


def parse_tokens(text: str | None) -> dict[str, str]:
    """`label=secret,other=secret2` (or a bare secret, labelled `default`) -> {secret: label}.

    >>> parse_tokens("dr-lee=abc,xyz")
    {'abc': 'dr-lee', 'xyz': 'default'}
    """
    tokens = {}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        label, equals, secret = item.partition("=")
        if not equals or not LABEL.fullmatch(label) or (secret and not secret.strip("=")):  # a bare secret (base64 padding too)
            label, secret = "default", item
        if not secret:
            raise OptionError(f"--token {label}=: the secret is empty.")
        if len(label) > MAX_LABEL:
            raise OptionError(f"--token {label[:20]}...=: a label has at most {MAX_LABEL} characters.")
        tokens[secret] = label
    return tokens


def page_session(secret: str) -> str:
    """The sign-in cookie's value for a token: an HMAC of it, so a leaked cookie does not reveal the API token.

    Derived, not stored: every instance behind a proxy accepts it, a restart keeps it, and
    removing the token from --token ends its sessions.

    >>> page_session("abc") == page_session("abc") != page_session("abd")
    True
    """
    return hmac.new(secret.encode(), b"melanoma-triage page session v1", hashlib.sha256).hexdigest()


def _token_label(request: Request, tokens: dict[str, str]) -> str | None:
    """The label of the token the request presents (a bearer header, or the sign-in cookie), if valid."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        presented, expected = header[7:].strip(), lambda secret: secret
    elif TOKEN_COOKIE in request.cookies:
        presented, expected = request.cookies[TOKEN_COOKIE], page_session
    else:
        return None
    return _matching_label(presented, tokens, expected)


def _matching_label(presented: str, tokens: dict[str, str], expected: Callable[[str], str]) -> str | None:
    """Constant-time comparison of what was presented with each token's expected form."""
    return next((label for secret, label in tokens.items() if hmac.compare_digest(presented.encode(), expected(secret).encode())), None)


class BodyLimit:
    """ASGI middleware: 413 for a request body over `max_bytes`, whether it says its length or is chunked."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": f"request of {int(declared)} bytes; at most {self.max_bytes}."}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"request body over {self.max_bytes} bytes.")
            return message

        await self.app(scope, counted, send)


UNAUTHORIZED = "a valid token is required: Authorization: Bearer TOKEN (pages: /login)."


class TokenGate:
    """ASGI middleware: with tokens, a request without a valid one gets 401 before its body is read
    (an anonymous client cannot make the service take in a 200 MB upload); /healthz, /readyz and /login
    stay open, with bodies of at most `OPEN_MAX_BYTES`."""

    def __init__(self, app: ASGIApp, tokens: dict[str, str]) -> None:
        self.app, self.tokens = app, tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.tokens:
            await self.app(scope, receive, send)
            return
        if scope["path"] in OPEN_PATHS:
            await BodyLimit(self.app, OPEN_MAX_BYTES)(scope, receive, send)
            return
        request = Request(scope)
        label = _token_label(request, self.tokens)
        if label is None:
            await _error_answer(request, UNAUTHORIZED, 401)(scope, receive, send)
            return
        scope.setdefault("state", {})["actor"] = label
        await self.app(scope, receive, send)


def request_actor(request: Request) -> str:
    """The label of the request's token, as `TokenGate` found it ("anonymous" when the app has no tokens)."""
    if not request.app.state.tokens:
        return "anonymous"
    label = getattr(request.state, "actor", None)
    if label is None:  # not through the gate: refuse rather than serve unguarded
        raise HTTPException(401, UNAUTHORIZED)
    return label


Actor = Annotated[str, Depends(request_actor)]


def create_app(service: TriageService, tokens: dict[str, str] | None = None, max_request_bytes: int = 200 * 1024 * 1024) -> FastAPI:
    """The FastAPI app of a triage service; `tokens` ({secret: label}) turns access control on."""
    app = FastAPI(title="Melanoma triage", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tokens = dict(tokens or {})

    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.add_middleware(TokenGate, tokens=app.state.tokens)  # added last, so it runs first

    _add_error_handlers(app)
    _add_api_routes(app, service)
    _add_pages(app, service)
    return app


def _page(request: Request, template: str, context: dict, status: int = 200) -> HTMLResponse:
    return TEMPLATES.TemplateResponse(request, template, {"sexes": SEXES, "sites": SITES, "outcomes": REVIEW_OUTCOMES, **context}, status_code=status)


def _uploads(service: TriageService, files: list[UploadFile]) -> list[tuple[str, bytes]]:
    """(name, content) of each uploaded file, read up to one byte past the limit (so an oversized one is refused, not truncated)."""
    if len(files) > service.limits.max_files:
        raise UploadError(413, f"{len(files)} images in one request; at most {service.limits.max_files}.")
    return [(f.filename or "image", f.file.read(service.limits.max_bytes + 1)) for f in files]


def _error_answer(request: Request, message: str, status: int, extra: dict | None = None) -> Response:
    """JSON under the API, a page elsewhere: the sign-in form for 401, an error page otherwise."""
    if request.url.path.startswith(API):
        return JSONResponse({"detail": message, **(extra or {})}, status_code=status)
    return _page(request, "login.html" if status == 401 else "error.html", {"message": message}, status)


ERROR_STATUS: dict[type[Exception], int] = {NotFound: 404, StoreUnavailable: 503}


def _add_error_handlers(app: FastAPI) -> None:
    """Refused uploads: their status with the reason (and allowed values); what is not found, or not
    served now, its status; 401 on a page: the sign-in form."""

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, error: UploadError) -> Response:
        return _error_answer(request, str(error), error.status, {"allowed": error.allowed} if error.allowed else None)

    def answer_with(status: int) -> Callable[[Request, Exception], Awaitable[Response]]:
        async def handler(request: Request, error: Exception) -> Response:  # on the event loop, not a worker thread
            return _error_answer(request, str(error), status)
        return handler

    for kind, status in ERROR_STATUS.items():
        app.add_exception_handler(kind, answer_with(status))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        if error.status_code == 401:
            return _error_answer(request, error.detail, 401)
        return JSONResponse({"detail": error.detail}, status_code=error.status_code)


def _add_api_routes(app: FastAPI, service: TriageService) -> None:
    """The JSON API under /api/v1, and the health probes."""

    @app.get("/healthz")
    async def healthz() -> dict:  # on the event loop: answers while every worker thread waits to score
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Response:
        try:
            ready = service.ready()
        except Exception as error:  # the database is down or unreachable
            return JSONResponse({"status": "unavailable", "detail": type(error).__name__}, status_code=503)
        return JSONResponse({"status": "ready" if ready else "unavailable", "bundle_sha256": service.bundle_sha256}, status_code=200 if ready else 503)

    @app.post(f"{API}/patients/{{patient_id}}/lesions")
    def upload_lesions(
        patient_id: str, *, who: Actor, files: Annotated[list[UploadFile], File()],
        age: Annotated[str | None, Form()] = None, sex: Annotated[str | None, Form()] = None, site: Annotated[str | None, Form()] = None,
    ) -> dict:
        """Store one or more images as lesions of the patient, then re-score all the patient's lesions."""
        return service.add_lesions(patient_id, _uploads(service, files), age=age, sex=sex, site=site, actor=who)

    @app.get(f"{API}/patients/{{patient_id}}")
    def get_patient(patient_id: str, who: Actor) -> dict:
        """The patient's lesions with their latest scores, riskiest first."""
        found = service.patient(patient_id)
        if found is None:
            raise NotFound(f"no patient {patient_id[:140]!r}.")
        return found

    @app.get(f"{API}/worklist")
    def get_worklist(who: Actor, status: str = "open") -> dict:
        """Alerted lesions across patients, highest risk first: open (not reviewed) or reviewed."""
        return {"status": status, "lesions": service.worklist(status)}

    @app.post(f"{API}/lesions/{{lesion_id}}/review")
    def post_review(lesion_id: LesionId, review: ReviewIn, who: Actor) -> dict:
        """Record an outcome: biopsy, benign or follow-up, with a note."""
        return service.review(lesion_id, review.outcome, note=review.note, actor=who, score_id=review.score_id)

    @app.get(f"{API}/lesions/{{lesion_id}}/gradcam.png", response_class=Response)
    def gradcam(lesion_id: LesionId, who: Actor) -> Response:
        """Where the CNNs found melanoma evidence (computed on demand, cached)."""
        return Response(service.gradcam_png(lesion_id), media_type="image/png")

    @app.get(f"{API}/lesions/{{lesion_id}}/image", response_class=Response)
    def lesion_image(lesion_id: LesionId, who: Actor) -> Response:
        """The uploaded image."""
        path, media_type = service.image_file(lesion_id)
        return Response(path.read_bytes(), media_type=media_type)


def _add_pages(app: FastAPI, service: TriageService) -> None:
    """The server-rendered pages: upload form, patient, worklist with reviews, sign-in, API docs."""

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_schema(who: Actor) -> dict:
        return app.openapi()

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    def docs(request: Request, who: Actor) -> HTMLResponse:
        return _page(request, "docs.html", {"schema": app.openapi()})

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request) -> HTMLResponse:
        return _page(request, "login.html", {"message": ""})

    @app.post("/login")
    def login(request: Request, token: Annotated[str, Form()]) -> Response:
        if app.state.tokens and _matching_label(token, app.state.tokens, lambda secret: secret) is None:
            return _page(request, "login.html", {"message": "That token is not valid here."}, 401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(TOKEN_COOKIE, page_session(token), httponly=True, samesite="strict", secure=request.url.scheme == "https")
        return response

    @app.get("/", response_class=HTMLResponse)
    def upload_page(request: Request, who: Actor) -> HTMLResponse:
        return _page(request, "upload.html", {"who": who})

    @app.post("/upload")
    def upload_form(
        who: Actor, patient_id: Annotated[str, Form()], *, files: Annotated[list[UploadFile], File()],
        age: Annotated[str | None, Form()] = None, sex: Annotated[str | None, Form()] = None, site: Annotated[str | None, Form()] = None,
    ) -> Response:
        service.add_lesions(patient_id, _uploads(service, files), age=age, sex=sex, site=site, actor=who)
        return RedirectResponse(f"/patients/{quote(patient_id, safe='')}", status_code=303)

    @app.get("/patients/{patient_id}", response_class=HTMLResponse)
    def patient_page(request: Request, patient_id: str, who: Actor) -> HTMLResponse:
        found = service.patient(patient_id)
        if found is None:
            return _page(request, "error.html", {"message": f"No patient {patient_id!r}."}, 404)
        return _page(request, "patient.html", {"patient": found, "who": who})

    @app.get("/worklist", response_class=HTMLResponse)
    def worklist_page(request: Request, who: Actor, status: str = "open") -> HTMLResponse:
        return _page(request, "worklist.html", {"lesions": service.worklist(status), "status": status, "who": who})

    @app.post("/lesions/{lesion_id}/review")
    def review_form(
        lesion_id: LesionId, who: Actor, *, outcome: Annotated[str, Form()], note: Annotated[str, Form()] = "", score_id: Annotated[int | None, Form()] = None,
    ) -> Response:
        service.review(lesion_id, outcome, note=note, actor=who, score_id=score_id)
        return RedirectResponse("/worklist", status_code=303)
