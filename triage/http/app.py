"""The FastAPI app of a triage service: routers, typed dependencies, middleware, error answers.

    create_app(settings) -> an ASGI app (run it with uvicorn; `python cli.py serve` does)

The JSON API under /api/v1 takes `Authorization: Bearer TOKEN` only; the pages take a session cookie
from /login. /healthz, /readyz, /login and the style sheet are open. The OpenAPI document
(/openapi.json, with a bearer token or a session) describes every request and answer.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import timedelta

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from triage.http.deps import Identity
from triage.http.errors import API, add_error_handlers, error_answer
from triage.http.metrics import Metrics
from triage.http.middleware import AccessGate, BodyLimit, RequestContext
from triage.http.routers import auth, health, lesions, monitoring, pages, patients, worklist
from triage.security import SESSION_COOKIE, SignedIn, SignInThrottle, live_session, token_label
from triage.service import TriageService
from triage.settings import Settings
from triage.uploads import UploadLimits

OPEN_PATHS = ("/healthz", "/readyz", "/login", "/assets/triage.css")
OPEN_MAX_BYTES = 64 * 1024  # the body a request without a token may send (a sign-in form)
ANONYMOUS = "anonymous"  # the actor of a service started without tokens (on loopback only)


def build_service(settings: Settings) -> TriageService:
    limits = UploadLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels, max_files=settings.max_files)
    return TriageService(bundle_path=settings.bundle, database_url=settings.database, store_dir=settings.image_store, limits=limits, batch_size=settings.batch_size)


def _identify(request: Request) -> Identity | None:
    """Who a request is, before its body is read: the API and /metrics by bearer token only, pages (and
    the API's description) by page session."""
    settings: Settings = request.app.state.settings
    tokens = settings.token_labels
    if not tokens:
        return Identity(ANONYMOUS, request.app.state.anonymous_session)
    header = request.headers.get("authorization", "")
    bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
    if request.url.path.startswith(API) or request.url.path == "/metrics" or (bearer is not None and request.url.path == "/openapi.json"):
        label = None if bearer is None else token_label(bearer, tokens)
        return None if label is None else Identity(label)
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie is None:
        return None
    service: TriageService = request.app.state.service
    with service.sessions.begin() as session:
        signed_in = live_session(session, cookie, idle=timedelta(minutes=settings.idle_minutes), labels=set(tokens.values()))
    return None if signed_in is None else Identity(signed_in.actor, signed_in)


def create_app(settings: Settings, service: TriageService | None = None) -> FastAPI:
    """The app of a service (built from `settings` unless given: tests share one bundle's service)."""
    app = FastAPI(title="Melanoma triage", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.service = service or build_service(settings)
    app.state.throttle = SignInThrottle(attempts=settings.sign_in_attempts)
    # without tokens (loopback only) the forms still carry a token, bound to this process
    secret = hmac.new(app.state.service.bundle_sha256.encode(), str(id(app)).encode(), hashlib.sha256).hexdigest()
    app.state.anonymous_session = SignedIn(ANONYMOUS, secret, "")
    app.state.metrics = Metrics(app.state.service)
    for router in (health.router, patients.router, lesions.router, worklist.router, monitoring.router, auth.router, pages.router):
        app.include_router(router)

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    add_error_handlers(app)
    # added innermost first: the request context runs first, then the gate, then the body limit
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, answer=error_answer)
    app.add_middleware(AccessGate, identify=_identify, answer=error_answer, open_paths=OPEN_PATHS, open_max_bytes=OPEN_MAX_BYTES)
    app.add_middleware(RequestContext, answer=error_answer, observe=app.state.metrics.observe_request)
    return app

