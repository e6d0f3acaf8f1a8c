"""The service's tables. Every change to them is an Alembic revision under `triage/db/migrations`
(`tests/test_triage_migrations.py` checks that the models and the migrations agree).

    patients        one row per patient id
    lesions         one uploaded image with its metadata; `latest_score_id` names its current score
    scores          one row per scoring of a lesion: bundle hash and version, probability, alert, rank,
                    time, who (only ever added: with reviews, the audit trail)
    reviews         a dermatologist's outcome, with the score it answered
    lesion_inputs   what the bundle's CNNs and feature extractor said about one image content: computed
                    once per (image, bundle), so adding a lesion never re-reads the patient's other images
    read_records    every read of a patient's data: who, which route, when, under which request id
    page_sessions   signed-in browsers: the hash of the cookie, who, when it ends, its CSRF token
    outcomes        a lesion's ground truth once known: its histopathology diagnosis (or benign, not
                    biopsied, after follow-up), when and who entered it (only ever added: the latest counts)
"""

from __future__ import annotations

from datetime import date, datetime, timezone

from sqlalchemy import JSON, Boolean, Date, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ID_LENGTH, LABEL_LENGTH, SHA_LENGTH = 128, 64, 64


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(moment: datetime | None) -> datetime | None:
    """A stored time as an aware UTC time (SQLite hands back naive ones; every time stored is UTC)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"

    patient_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    lesions: Mapped[list[Lesion]] = relationship(back_populates="patient", order_by="Lesion.lesion_id")


class Lesion(Base):
    __tablename__ = "lesions"

    lesion_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.patient_id"), index=True)
    image_sha256: Mapped[str] = mapped_column(String(SHA_LENGTH), index=True)
    image_suffix: Mapped[str] = mapped_column(String(8))  # .jpg or .png, from the content
    file_name: Mapped[str] = mapped_column(String(255))  # as uploaded, for the reader only
    age: Mapped[float | None] = mapped_column(Float, nullable=True)
    sex: Mapped[str | None] = mapped_column(String(16), nullable=True)
    site: Mapped[str | None] = mapped_column(String(32), nullable=True)
    uploaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    uploaded_by: Mapped[str] = mapped_column(String(LABEL_LENGTH))
    # its current score (a pointer the scoring transaction keeps, so reading a patient never scans its score history)
    latest_score_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    patient: Mapped[Patient] = relationship(back_populates="lesions")
    reviews: Mapped[list[Review]] = relationship(back_populates="lesion", order_by="Review.review_id")
    outcomes: Mapped[list[Outcome]] = relationship(back_populates="lesion", order_by="Outcome.outcome_id")


class Score(Base):
    __tablename__ = "scores"

    score_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lesion_id: Mapped[int] = mapped_column(ForeignKey("lesions.lesion_id"), index=True)
    bundle_sha256: Mapped[str] = mapped_column(String(SHA_LENGTH))
    bundle_version: Mapped[str] = mapped_column(String(64))  # the bundle's creation time and format version
    melanoma_probability: Mapped[float] = mapped_column(Float)
    alert: Mapped[bool] = mapped_column(Boolean)
    alert_threshold: Mapped[float] = mapped_column(Float)
    rank_in_patient: Mapped[int] = mapped_column(Integer)
    diagnosis: Mapped[dict] = mapped_column(JSON)  # class -> probability
    missing_metadata: Mapped[list] = mapped_column(JSON)
    scored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    scored_by: Mapped[str] = mapped_column(String(LABEL_LENGTH))  # the token label of the request that caused it
    pattern: Mapped[str | None] = mapped_column(String(32), nullable=True)  # the lesion's missingness pattern (None: scored before it was kept)
    operating_point: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)  # the pattern whose threshold judged it


class Review(Base):
    __tablename__ = "reviews"

    review_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lesion_id: Mapped[int] = mapped_column(ForeignKey("lesions.lesion_id"), index=True)
    score_id: Mapped[int | None] = mapped_column(ForeignKey("scores.score_id"), nullable=True)  # the score the reviewer saw
    outcome: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(Text, default="")
    reviewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    reviewed_by: Mapped[str] = mapped_column(String(LABEL_LENGTH))
    lesion: Mapped[Lesion] = relationship(back_populates="reviews")


class LesionInputs(Base):
    __tablename__ = "lesion_inputs"

    image_sha256: Mapped[str] = mapped_column(String(SHA_LENGTH), primary_key=True)
    bundle_sha256: Mapped[str] = mapped_column(String(SHA_LENGTH), primary_key=True)
    cnn_outputs: Mapped[dict] = mapped_column(JSON)  # CNN name -> fold -> melanoma probability
    image_features: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # feature -> value (None: the stack takes none)
    diagnosis: Mapped[dict] = mapped_column(JSON)  # class -> probability (empty without a diagnosis head)
    image_statistics: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # colour and contrast (fusion.shift), for shift monitoring
    computed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class ReadRecord(Base):
    __tablename__ = "read_records"

    record_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    read_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    actor: Mapped[str] = mapped_column(String(LABEL_LENGTH))
    route: Mapped[str] = mapped_column(String(255))  # the route's template, e.g. /api/v1/patients/{patient_id}
    patient_id: Mapped[str | None] = mapped_column(String(ID_LENGTH), nullable=True, index=True)
    lesion_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    request_id: Mapped[str] = mapped_column(String(32))


class PageSession(Base):
    __tablename__ = "page_sessions"

    session_sha256: Mapped[str] = mapped_column(String(SHA_LENGTH), primary_key=True)  # of the cookie: a database dump signs nobody in
    actor: Mapped[str] = mapped_column(String(LABEL_LENGTH))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Outcome(Base):
    __tablename__ = "outcomes"

    outcome_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lesion_id: Mapped[int] = mapped_column(ForeignKey("lesions.lesion_id"), index=True)
    diagnosis: Mapped[str] = mapped_column(String(32))  # a class of the bundle, or `benign-not-biopsied`
    diagnosed_on: Mapped[date] = mapped_column(Date)
    note: Mapped[str] = mapped_column(Text, default="")
    entered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    entered_by: Mapped[str] = mapped_column(String(LABEL_LENGTH))
    lesion: Mapped[Lesion] = relationship(back_populates="outcomes")
