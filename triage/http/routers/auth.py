"""Signing in and out of the pages: a token buys a session cookie; sign-in is throttled per client and
must come from the service's own origin; sign-out ends the session on the server."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from triage.errors import Forbidden, NotSignedIn, Throttled
from triage.http.deps import CurrentSettings, FormFrom, Service, own_origin
from triage.http.errors import page
from triage.security import SESSION_COOKIE, end_session, same_origin, start_session, token_label

router = APIRouter(include_in_schema=False)
MAX_TOKEN = 512  # characters a sign-in form's token may have


@router.get("/login")
def login_form(request: Request) -> Response:
    return page(request, "login.html", {"message": ""})


@router.post("/login")
def login(request: Request, token: Annotated[str, Form(max_length=MAX_TOKEN)], service: Service, settings: CurrentSettings) -> Response:
    """A valid token starts a page session; a wrong one counts against the client's sign-in budget."""
    if not same_origin(dict(request.headers), own_origin(request)):
        raise Forbidden("sign in from this service's own sign-in page.")
    client, now = (request.client.host if request.client else "-"), time.monotonic()
    wait = request.app.state.throttle.retry_after(client, now)
    if wait:
        raise Throttled(f"too many failed sign-ins; try again in {wait} s.", retry_after=wait)
    label = token_label(token, settings.token_labels)
    if label is None:
        request.app.state.throttle.failed(client, now)
        raise NotSignedIn("that token is not valid here.")
    with service.sessions.begin() as session:
        cookie, _ = start_session(session, label, lifetime=timedelta(minutes=settings.session_minutes))
    answer = RedirectResponse("/", status_code=303)
    answer.set_cookie(SESSION_COOKIE, cookie, max_age=settings.session_minutes * 60, httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/")
    return answer


@router.post("/logout")
def logout(who: FormFrom, service: Service) -> Response:
    """End this session on the server (the cookie is then worthless, wherever it was copied to)."""
    with service.sessions.begin() as session:
        end_session(session, who.session.session_sha256)
    answer = RedirectResponse("/login", status_code=303)
    answer.delete_cookie(SESSION_COOKIE, path="/")
    return answer
