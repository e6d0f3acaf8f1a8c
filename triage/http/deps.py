"""Typed dependencies: the service, who is asking (set by the access gate), the reader a read records,
and the CSRF check every state-changing page request passes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Form, Request

from triage.errors import Forbidden, NotSignedIn
from triage.security import SignedIn, csrf_matches, same_origin
from triage.service import Reader, TriageService
from triage.settings import Settings


@dataclass(frozen=True)
class Identity:
    """Who a request is: a token's label, and the page session it came through (None: a bearer token)."""

    actor: str
    session: SignedIn | None = None


def get_service(request: Request) -> TriageService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_identity(request: Request) -> Identity:
    identity = request.scope.get("state", {}).get("identity")
    if identity is None:  # not through the gate: refuse rather than serve unguarded
        raise NotSignedIn("a valid token is required.")
    return identity


def get_reader(request: Request, identity: Annotated[Identity, Depends(get_identity)]) -> Reader:
    """The record a read of patient data leaves: who, the route's template, the request's id."""
    route = getattr(request.scope.get("route"), "path", request.url.path)
    return Reader(actor=identity.actor, route=route, request_id=request.scope["state"]["request_id"])


def own_origin(request: Request) -> str:
    return f"{request.url.scheme}://{request.headers.get('host', request.url.netloc)}"


def checked_form(request: Request, identity: Annotated[Identity, Depends(get_identity)], csrf_token: Annotated[str | None, Form(max_length=128)] = None) -> Identity:
    """A state-changing page request: from this service's own origin, carrying its session's CSRF token."""
    if not same_origin(dict(request.headers), own_origin(request)):
        raise Forbidden("this form must be sent from this service's own pages.")
    if identity.session is None or not csrf_matches(csrf_token, identity.session.csrf_token):
        raise Forbidden("the form's security token is missing or stale: reload the page and send it again.")
    return identity


Service = Annotated[TriageService, Depends(get_service)]
CurrentSettings = Annotated[Settings, Depends(get_settings)]
Who = Annotated[Identity, Depends(get_identity)]
ReadBy = Annotated[Reader, Depends(get_reader)]
FormFrom = Annotated[Identity, Depends(checked_form)]
