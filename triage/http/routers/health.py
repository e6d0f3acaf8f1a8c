"""Probes for a load balancer: open, no patient data."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from triage.http.deps import Service
from triage.schemas import HealthOut, ReadyOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut)
async def healthz() -> HealthOut:  # on the event loop: answers while every worker thread is busy scoring
    """The process answers."""
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut, responses={503: {"model": ReadyOut}})
def readyz(service: Service) -> JSONResponse:
    """The database answers and the bundle is loaded."""
    try:
        ready = service.ready()
    except Exception:  # the database is down or unreachable: the probe's answer, not an error
        ready = False
    body = ReadyOut(status="ready" if ready else "unavailable", bundle_sha256=service.bundle_sha256 if ready else None)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
