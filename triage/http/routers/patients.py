"""/api/v1/patients: upload a patient's lesions (one or a whole exam per request), read a patient."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Path, UploadFile

from triage.http.deps import ReadBy, Service, Who
from triage.http.routers import ERROR_RESPONSES
from triage.schemas import PATIENT_ID_PATTERN, PatientOut
from triage.service import TriageService
from triage.uploads import checked_metadata

router = APIRouter(prefix="/api/v1/patients", tags=["patients"], responses=ERROR_RESPONSES)
PatientPath = Annotated[str, Path(pattern=PATIENT_ID_PATTERN, max_length=128, description="1-128 letters, digits, '.', '_' or '-'.")]
FormText = Annotated[str | None, Form(max_length=64)]


def read_uploads(service: TriageService, files: list[UploadFile]) -> list[tuple[str, bytes]]:
    """(name, content) of each uploaded file, read up to one byte past the limit (so an oversized one is refused, not truncated)."""
    return [(f.filename or "image", f.file.read(service.limits.max_bytes + 1)) for f in files[: service.limits.max_files + 1]]


@router.post("/{patient_id}/lesions", response_model=PatientOut)
def upload_lesions(
    patient_id: PatientPath, *, files: Annotated[list[UploadFile], File(min_length=1, description="JPEG or PNG images, one or more.")],
    service: Service, who: Who, reader: ReadBy, age: FormText = None, sex: FormText = None, site: FormText = None,
) -> PatientOut:
    """Store one or more images as lesions of the patient, then score the patient (every lesion, from
    each image's kept CNN outputs: only new images run through the models)."""
    return service.add_lesions(patient_id, read_uploads(service, files), checked_metadata(age=age, sex=sex, site=site), actor=who.actor, reader=reader)


@router.get("/{patient_id}", response_model=PatientOut)
def get_patient(patient_id: PatientPath, service: Service, reader: ReadBy) -> PatientOut:
    """The patient's lesions with their current scores, riskiest first."""
    return service.patient(patient_id, reader=reader)
