"""What the service takes and gives, as pydantic models: the JSON API's requests and responses (so the
OpenAPI document is a schema a client can be generated from) and what the pages render.

Every field is bounded: ids by pattern and length, notes by length and characters, numbers by range.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from metadata.schema import DIAGNOSES, MAX_AGE, SEXES, SITES

PATIENT_ID_PATTERN = r"^[A-Za-z0-9._-]{1,128}$"  # safe in a URL path and a file name
MAX_NOTE = 4000  # characters of a review note
MAX_LESION_ID = 2**31 - 1  # a database integer key
REVIEW_OUTCOMES = ("biopsy", "benign", "follow-up")
BENIGN_NOT_BIOPSIED = "benign-not-biopsied"  # an outcome after follow-up: benign, without histopathology
OUTCOME_DIAGNOSES = (*DIAGNOSES, BENIGN_NOT_BIOPSIED)  # a histopathology diagnosis, or benign after follow-up without one

PatientId = Annotated[str, StringConstraints(pattern=PATIENT_ID_PATTERN)]
LesionId = Annotated[int, Field(ge=1, le=MAX_LESION_ID)]
Note = Annotated[str, StringConstraints(max_length=MAX_NOTE, pattern=r"^[^\x00]*$")]
Sex = Literal[SEXES]
Site = Literal[SITES]
Outcome = Literal[REVIEW_OUTCOMES]
OutcomeDiagnosis = Literal[OUTCOME_DIAGNOSES]
DiagnosisDate = Annotated[date, Field(ge=date(1900, 1, 1), le=date(2999, 12, 31))]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LesionMetadata(Strict):
    """What the upload form or request says about the lesions it carries (empty: missing)."""

    age: float | None = Field(None, ge=0, le=MAX_AGE)
    sex: Sex | None = None
    site: Site | None = None


class ReviewIn(Strict):
    """A dermatologist's outcome for a lesion, with the score they saw (default: its latest)."""

    outcome: Outcome
    note: Note = ""
    score_id: Annotated[int, Field(ge=1, le=MAX_LESION_ID)] | None = None


class ReviewOut(Strict):
    review_id: int
    lesion_id: int
    score_id: int | None
    outcome: Outcome
    note: str
    reviewed_at: datetime
    reviewed_by: str


class OutcomeIn(Strict):
    """A lesion's ground truth once known: the histopathology diagnosis (a class of the bundle), or
    `benign-not-biopsied` after follow-up, and the day it was established (not in the future)."""

    diagnosis: OutcomeDiagnosis
    diagnosed_on: DiagnosisDate
    note: Note = ""


class OutcomeOut(Strict):
    outcome_id: int
    lesion_id: int
    diagnosis: str
    diagnosed_on: date
    note: str
    entered_at: datetime
    entered_by: str


class LesionOut(Strict):
    """One lesion with its current score (None before its first scoring) and its reviews."""

    lesion_id: int
    patient_id: str
    image_sha256: str
    file_name: str
    age: float | None
    sex: str | None
    site: str | None
    uploaded_at: datetime
    melanoma_probability: float | None
    alert: bool | None
    alert_threshold: float | None
    rank_in_patient: int | None
    diagnosis: dict[str, float]
    missing_metadata: list[str]
    scored_at: datetime | None
    score_id: int | None
    bundle_sha256: str | None
    reviews: list[ReviewOut]
    outcome: OutcomeOut | None  # the latest entered


class Interval(Strict):
    """An observed figure and its 95% patient-bootstrap interval (None: no lesion to measure it on)."""

    value: float | None
    low: float | None
    high: float | None


class OperatingPointFigures(Strict):
    """One operating point of one bundle on the clinic's own lesions, beside its promise (the loaded bundle's only)."""

    operating_point: str
    lesions_scored: int
    alert_rate: Interval
    lesions_with_outcome: int
    melanomas: int
    sensitivity: Interval
    specificity: Interval
    ppv: Interval
    threshold: float | None = None
    promised_sensitivity: float | None = None
    promised_sensitivity_ci: list[float] | None = None
    promised_specificity: float | None = None
    promised_alert_rate: float | None = None
    flags: list[str]


class BundleFigures(Strict):
    bundle_sha256: str
    bundle_version: str
    serving: bool  # the bundle this instance scores with
    operating_points: list[OperatingPointFigures]


class ShiftFigures(Strict):
    """The latest uploads against what the bundle saw out of fold (`fusion.shift`)."""

    window_lesions: int
    warnings: list[str]


class MonitoringOut(Strict):
    bundles: list[BundleFigures]
    shift: ShiftFigures
    flagged: bool  # a promise of the serving bundle lies outside what was observed


class PatientOut(Strict):
    """A patient's lesions with their current scores, riskiest first."""

    patient_id: str
    lesions: list[LesionOut]


class WorklistOut(Strict):
    """Alerted lesions across patients, highest risk first: without a review (`open`) or with one (`reviewed`)."""

    status: Literal["open", "reviewed"]
    lesions: list[LesionOut]


class ErrorOut(Strict):
    """Every error answer: what to fix, the request's id (the server's log has the rest), and the allowed values where there are some."""

    detail: str
    request_id: str
    allowed: list[str] | None = None


class HealthOut(Strict):
    status: Literal["ok"]


class ReadyOut(Strict):
    status: Literal["ready", "unavailable"]
    bundle_sha256: str | None = None
