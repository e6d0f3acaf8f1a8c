"""What can go wrong in the service, without HTTP: `triage.http.errors` maps each kind to its status in
one place. A message says what the user can fix and nothing of the server (no path, no object); the
details go to the log under the request's id, which the answer carries."""

from __future__ import annotations

from errors import UserError


class TriageError(UserError):
    """A request the service refuses; the message is safe to show."""


class NotFound(TriageError):
    """No such patient, lesion, or score of that lesion."""


class Invalid(TriageError):
    """A value outside what the service accepts; `allowed` lists the choices where there are some."""

    def __init__(self, message: str, allowed: list[str] | None = None) -> None:
        super().__init__(message)
        self.allowed = allowed


class TooLarge(TriageError):
    """An upload over a limit (bytes, pixels, files)."""


class NotSignedIn(TriageError):
    """No valid token or session."""


class Forbidden(TriageError):
    """A state-changing request from another origin, or without its form's CSRF token."""


class Throttled(TriageError):
    """Too many failed sign-ins from one client; `retry_after` seconds until the next is heard."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Busy(TriageError):
    """The patient stayed locked by other uploads longer than the bounded wait."""


class Unavailable(Exception):
    """The server cannot serve it now (a stored image is missing, the database is down): the server's
    fault, not the user's; its detail goes to the log only."""
