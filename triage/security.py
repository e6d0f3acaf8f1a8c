"""Who may do what: access tokens for the API, page sessions for browsers, CSRF tokens, sign-in throttling.

The JSON API is reachable by bearer token only; a browser signs in once with a token and gets a
session cookie (a random value; the database keeps its hash), which ends at sign-out, after
`session_minutes`, after `idle_minutes` without a request, or when its token is removed. Every
state-changing page request must come from the service's own origin (its `Origin`, else its
`Referer`) and carry its session's CSRF token; a sign-in is throttled per client.

>>> throttle = SignInThrottle(attempts=2, window_seconds=60)
>>> throttle.failed("10.0.0.1", now=0.0); throttle.failed("10.0.0.1", now=1.0)
>>> throttle.retry_after("10.0.0.1", now=2.0), throttle.retry_after("10.0.0.1", now=61.0)
(58, 0)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from sqlalchemy import update
from sqlalchemy.orm import Session

from triage.db.models import PageSession, as_utc, utc_now

SESSION_COOKIE = "triage_session"
CSRF_FIELD = "csrf_token"
LAST_SEEN_GRANULARITY = timedelta(minutes=1)  # how often a session's last request is written (idle timeout resolution)


def token_label(presented: str, tokens: dict[str, str]) -> str | None:
    """The label of the token presented, comparing in constant time with each; None when none matches."""
    given = presented.encode("utf-8", "surrogateescape")
    return next((label for secret, label in tokens.items() if hmac.compare_digest(given, secret.encode())), None)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class SignedIn:
    """A page session in use: who, and the CSRF token its forms carry."""

    actor: str
    csrf_token: str
    session_sha256: str


def start_session(session: Session, actor: str, *, lifetime: timedelta) -> tuple[str, SignedIn]:
    """A new page session for `actor`: (the cookie value, the session)."""
    cookie, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = utc_now()
    session.add(PageSession(session_sha256=sha256(cookie), actor=actor, csrf_token=csrf, created_at=now, last_seen_at=now, expires_at=now + lifetime))
    return cookie, SignedIn(actor, csrf, sha256(cookie))


def live_session(session: Session, cookie: str, *, idle: timedelta, labels: set[str]) -> SignedIn | None:
    """The session a cookie names, if it has not ended, expired, idled out or lost its token; its last
    request is recorded (at most once a minute)."""
    found = session.get(PageSession, sha256(cookie))
    now = utc_now()
    if found is None or found.ended_at is not None or found.actor not in labels:
        return None
    if now >= as_utc(found.expires_at) or now - as_utc(found.last_seen_at) >= idle:
        return None
    if now - as_utc(found.last_seen_at) >= LAST_SEEN_GRANULARITY:
        session.execute(update(PageSession).where(PageSession.session_sha256 == found.session_sha256).values(last_seen_at=now))
    return SignedIn(found.actor, found.csrf_token, found.session_sha256)


def end_session(session: Session, session_sha256: str) -> None:
    session.execute(update(PageSession).where(PageSession.session_sha256 == session_sha256, PageSession.ended_at.is_(None)).values(ended_at=utc_now()))


def same_origin(headers: dict[str, str], own_origin: str) -> bool:
    """Whether a request comes from the service's own origin (scheme, host and port), by its `Origin`
    header, or its `Referer` where a client sends no Origin; neither is refused."""
    claimed = headers.get("origin") or headers.get("referer")
    if not claimed:
        return False
    parts = urlsplit(claimed)
    return f"{parts.scheme}://{parts.netloc}" == own_origin


def csrf_matches(sent: str | None, expected: str) -> bool:
    return sent is not None and hmac.compare_digest(sent.encode("utf-8", "surrogateescape"), expected.encode())


class SignInThrottle:
    """At most `attempts` failed sign-ins per client within `window_seconds`; the next is answered 429."""

    def __init__(self, *, attempts: int, window_seconds: float = 60.0) -> None:
        self.attempts, self.window = attempts, window_seconds
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._guard = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        failures = self._failures[client]
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            self._failures.pop(client, None)
        return failures

    def retry_after(self, client: str, now: float) -> int:
        """Seconds until this client may try again (0: now)."""
        with self._guard:
            failures = self._recent(client, now)
            return 0 if len(failures) < self.attempts else max(1, int(failures[0] + self.window - now + 0.999))

    def failed(self, client: str, now: float) -> None:
        with self._guard:
            self._recent(client, now)
            self._failures[client].append(now)
