"""The server-rendered pages (no script): upload form, patient, worklist with reviews, images, API docs.

Reached with a page session; every form posts its session's CSRF token and must come from the
service's own origin (`triage.http.deps.checked_form`)."""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Literal
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import RedirectResponse, Response

from triage.http.deps import FormFrom, ReadBy, Service, Who
from triage.http.errors import page
from triage.http.routers.lesions import LesionPath
from triage.http.routers.patients import FormText, PatientPath, read_uploads
from triage.plots import monitoring_png
from triage.schemas import MAX_NOTE, OUTCOME_DIAGNOSES, DiagnosisDate, Outcome, OutcomeDiagnosis, OutcomeIn, ReviewIn
from triage.uploads import checked_metadata

router = APIRouter(include_in_schema=False)
STYLE = (FilePath(__file__).resolve().parents[2] / "templates" / "triage.css").read_bytes()


@router.get("/assets/triage.css")
async def style() -> Response:
    return Response(STYLE, media_type="text/css")


@router.get("/")
def upload_page(request: Request, who: Who) -> Response:
    return page(request, "upload.html", {})


@router.post("/upload")
def upload_form(
    *, who: FormFrom, service: Service, reader: ReadBy, patient_id: Annotated[str, Form(max_length=128)], files: Annotated[list[UploadFile], File()],
    age: FormText = None, sex: FormText = None, site: FormText = None,
) -> Response:
    service.add_lesions(patient_id, read_uploads(service, files), checked_metadata(age=age, sex=sex, site=site), actor=who.actor, reader=reader)
    return RedirectResponse(f"/patients/{quote(patient_id, safe='')}", status_code=303)


@router.get("/patients/{patient_id}")
def patient_page(request: Request, patient_id: PatientPath, service: Service, reader: ReadBy) -> Response:
    context = {"patient": service.patient(patient_id, reader=reader), "diagnoses": OUTCOME_DIAGNOSES, "back": f"/patients/{patient_id}"}
    return page(request, "patient.html", context)


@router.get("/worklist")
def worklist_page(request: Request, service: Service, reader: ReadBy, status: Literal["open", "reviewed"] = "open") -> Response:
    context = {"worklist": service.worklist(status, reader=reader), "diagnoses": OUTCOME_DIAGNOSES, "back": f"/worklist?status={status}"}
    return page(request, "worklist.html", context)


@router.post("/lesions/{lesion_id}/review")
def review_form(
    lesion_id: LesionPath, *, who: FormFrom, service: Service, outcome: Annotated[Outcome, Form()],
    note: Annotated[str, Form(max_length=MAX_NOTE, pattern=r"^[^\x00]*$")] = "", score_id: Annotated[int | None, Form(ge=1, le=2**31 - 1)] = None,
) -> Response:
    service.review(lesion_id, ReviewIn(outcome=outcome, note=note, score_id=score_id), actor=who.actor)
    return RedirectResponse("/worklist", status_code=303)


# where an outcome form returns to: one of the service's own pages, never an address from elsewhere
BACK = r"^/(patients/[A-Za-z0-9._-]{1,128}|worklist(\?status=(open|reviewed))?)$"


@router.post("/lesions/{lesion_id}/outcome")
def outcome_form(
    lesion_id: LesionPath, *, who: FormFrom, service: Service, diagnosis: Annotated[OutcomeDiagnosis, Form()], diagnosed_on: Annotated[DiagnosisDate, Form()],
    note: Annotated[str, Form(max_length=MAX_NOTE, pattern=r"^[^\x00]*$")] = "", back: Annotated[str, Form(pattern=BACK)] = "/worklist?status=reviewed",
) -> Response:
    service.record_outcome(lesion_id, OutcomeIn(diagnosis=diagnosis, diagnosed_on=diagnosed_on, note=note), actor=who.actor)
    return RedirectResponse(back, status_code=303)


@router.get("/monitoring")
def monitoring_page(request: Request, service: Service, who: Who) -> Response:
    return page(request, "monitoring.html", {"monitoring": service.monitoring()})


@router.get("/monitoring/plot.png")
def monitoring_plot(service: Service, who: Who) -> Response:
    return Response(monitoring_png(service.monitoring()), media_type="image/png")


@router.get("/lesions/{lesion_id}/image")
def lesion_image(lesion_id: LesionPath, service: Service, reader: ReadBy) -> Response:
    content, media_type = service.image(lesion_id, reader=reader)
    return Response(content, media_type=media_type)


@router.get("/lesions/{lesion_id}/gradcam.png")
def lesion_gradcam(lesion_id: LesionPath, service: Service, reader: ReadBy) -> Response:
    return Response(service.gradcam(lesion_id, reader=reader), media_type="image/png")


@router.get("/docs")
def docs(request: Request, who: Who) -> Response:
    return page(request, "docs.html", {"schema": request.app.openapi()})
