"""/api/v1/worklist: the alerts a dermatologist must see."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from triage.http.deps import ReadBy, Service
from triage.http.routers import ERROR_RESPONSES
from triage.schemas import WorklistOut

router = APIRouter(prefix="/api/v1/worklist", tags=["worklist"], responses=ERROR_RESPONSES)


@router.get("", response_model=WorklistOut)
def get_worklist(service: Service, reader: ReadBy, status: Literal["open", "reviewed"] = "open") -> WorklistOut:
    """Alerted lesions across patients, highest risk first: open (not reviewed) or reviewed."""
    return service.worklist(status, reader=reader)
