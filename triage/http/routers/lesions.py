"""/api/v1/lesions: a lesion's image and Grad-CAM, and its reviews."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from triage.http.deps import ReadBy, Service, Who
from triage.http.routers import ERROR_RESPONSES
from triage.schemas import MAX_LESION_ID, OutcomeIn, OutcomeOut, ReviewIn, ReviewOut

router = APIRouter(prefix="/api/v1/lesions", tags=["lesions"], responses=ERROR_RESPONSES)
LesionPath = Annotated[int, Path(ge=1, le=MAX_LESION_ID)]
IMAGE_RESPONSES = {200: {"content": {"image/jpeg": {}, "image/png": {}}, "description": "The image."}}


@router.get("/{lesion_id}/image", response_class=Response, responses=IMAGE_RESPONSES)
def lesion_image(lesion_id: LesionPath, service: Service, reader: ReadBy) -> Response:
    """The uploaded image."""
    content, media_type = service.image(lesion_id, reader=reader)
    return Response(content, media_type=media_type)


@router.get("/{lesion_id}/gradcam.png", response_class=Response, responses={200: {"content": {"image/png": {}}, "description": "The overlay."}})
def gradcam(lesion_id: LesionPath, service: Service, reader: ReadBy) -> Response:
    """Where the CNNs found melanoma evidence (computed on demand, kept)."""
    return Response(service.gradcam(lesion_id, reader=reader), media_type="image/png")


@router.post("/{lesion_id}/outcome", response_model=OutcomeOut)
def post_outcome(lesion_id: LesionPath, outcome: OutcomeIn, service: Service, who: Who) -> OutcomeOut:
    """Record a lesion's ground truth once known: its histopathology diagnosis (a class of the bundle), or
    `benign-not-biopsied` after follow-up, and the day; the latest entered counts."""
    return service.record_outcome(lesion_id, outcome, actor=who.actor)


@router.post("/{lesion_id}/review", response_model=ReviewOut)
def post_review(lesion_id: LesionPath, review: ReviewIn, service: Service, who: Who) -> ReviewOut:
    """Record an outcome (biopsy, benign or follow-up) with a note and the score seen (default: the current one)."""
    return service.review(lesion_id, review, actor=who.actor)
