"""/api/v1/monitoring and /metrics: how the alert performs on the clinic's own patients, against its promise."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from triage.http.deps import Service, Who
from triage.http.routers import ERROR_RESPONSES
from triage.schemas import MonitoringOut

router = APIRouter(tags=["monitoring"], responses=ERROR_RESPONSES)


@router.get("/api/v1/monitoring", response_model=MonitoringOut)
def get_monitoring(service: Service, who: Who) -> MonitoringOut:
    """Per bundle version and operating point: lesions scored, alert rate, and on lesions with a known
    outcome the observed sensitivity, specificity and PPV (95% patient-bootstrap intervals) beside
    the promise, with flags; and the latest uploads' shift from the training data."""
    return service.monitoring()


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}})
def metrics(request: Request, who: Who) -> Response:
    """Prometheus metrics (bearer token)."""
    return Response(request.app.state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
