"""The triage service's storage: a SQLAlchemy database and a content-addressed image store.

Tables: `patients`, `lesions` (one uploaded image with its metadata), `scores` (one row per scoring
of a lesion: bundle hash and version, probabilities, alert, rank, time, who) and `reviews` (a
dermatologist's outcome, with the score it answered). Scores and reviews are only ever added, never updated: together they are
the audit trail. SQLite (a file, WAL mode) is the default; any SQLAlchemy URL works, PostgreSQL
for several instances behind one proxy.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from errors import OptionError


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    __tablename__ = "patients"

    patient_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    lesions: Mapped[list[Lesion]] = relationship(back_populates="patient", order_by="Lesion.lesion_id")


class Lesion(Base):
    __tablename__ = "lesions"

    lesion_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    patient_id: Mapped[str] = mapped_column(ForeignKey("patients.patient_id"), index=True)
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_suffix: Mapped[str] = mapped_column(String(8))  # .jpg or .png, from the content
    file_name: Mapped[str] = mapped_column(String(255))  # as uploaded, for the reader only
    age: Mapped[float | None] = mapped_column(Float, nullable=True)
    sex: Mapped[str | None] = mapped_column(String(16), nullable=True)
    site: Mapped[str | None] = mapped_column(String(32), nullable=True)
    uploaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    uploaded_by: Mapped[str] = mapped_column(String(64))
    patient: Mapped[Patient] = relationship(back_populates="lesions")
    scores: Mapped[list[Score]] = relationship(back_populates="lesion", order_by="Score.score_id")
    reviews: Mapped[list[Review]] = relationship(back_populates="lesion", order_by="Review.review_id")


class Score(Base):
    __tablename__ = "scores"

    score_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lesion_id: Mapped[int] = mapped_column(ForeignKey("lesions.lesion_id"), index=True)
    bundle_sha256: Mapped[str] = mapped_column(String(64))
    bundle_version: Mapped[str] = mapped_column(String(64))  # the bundle's creation time and format version
    melanoma_probability: Mapped[float] = mapped_column(Float)
    alert: Mapped[bool] = mapped_column(Boolean)
    alert_threshold: Mapped[float] = mapped_column(Float)
    rank_in_patient: Mapped[int] = mapped_column(Integer)
    diagnosis: Mapped[dict] = mapped_column(JSON)  # class -> probability
    missing_metadata: Mapped[list] = mapped_column(JSON)
    scored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    scored_by: Mapped[str] = mapped_column(String(64))  # the token label of the request that caused it
    lesion: Mapped[Lesion] = relationship(back_populates="scores")


class Review(Base):
    __tablename__ = "reviews"

    review_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    lesion_id: Mapped[int] = mapped_column(ForeignKey("lesions.lesion_id"), index=True)
    score_id: Mapped[int | None] = mapped_column(ForeignKey("scores.score_id"), nullable=True)  # the score the reviewer saw
    outcome: Mapped[str] = mapped_column(String(16))
    note: Mapped[str] = mapped_column(Text, default="")
    reviewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    reviewed_by: Mapped[str] = mapped_column(String(64))
    lesion: Mapped[Lesion] = relationship(back_populates="reviews")


def database_engine(url: str) -> Engine:
    """An engine with the tables created; SQLite gets WAL mode, foreign keys and a busy timeout."""
    is_sqlite = url.startswith("sqlite")
    database = make_url(url).database
    if is_sqlite and database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False} if is_sqlite else {}, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record) -> None:  # noqa: ANN001
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    Base.metadata.create_all(engine)
    add_missing_columns(engine)
    return engine


def add_missing_columns(engine: Engine) -> list[str]:
    """Add the columns a database made by an earlier version lacks (nullable ones: earlier rows get NULL);
    `create_all` makes missing tables, never missing columns. Returns `table.column` of each one added."""
    added = []
    inspector = inspect(engine)
    for table in Base.metadata.sorted_tables:
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise RuntimeError(f"the database's table {table.name} lacks the column {column.name}, which cannot be added to existing rows; migrate it by hand.")
            references = "".join(f" REFERENCES {key.column.table.name}({key.column.name})" for key in column.foreign_keys)
            try:
                with engine.begin() as connection:
                    connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {column.type.compile(engine.dialect)}{references}"))
            except DBAPIError:  # another instance starting beside this one added it first
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise
                continue
            added.append(f"{table.name}.{column.name}")
    return added


def default_image_store(url: str) -> Path:
    """The image folder beside a SQLite database file; other databases need one named (every instance shares it).

    >>> default_image_store("sqlite:///triage/triage.db").as_posix()
    'triage/images'
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        raise OptionError(f"--database {url.split('@')[-1]}: not a SQLite file, so give --store DIR for the uploaded images (shared by every instance).")
    return Path(parsed.database).parent / "images"


class ImageStore:
    """Uploaded images under ROOT/<first two hex digits>/<sha256><suffix>: one file per content, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str, suffix: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}{suffix}"

    def put(self, content: bytes, suffix: str) -> tuple[str, bool]:
        """Store `content`; (its sha256, whether this call created the file)."""
        sha256 = hashlib.sha256(content).hexdigest()
        target = self.path(sha256, suffix)
        if target.exists():
            try:  # touched, so a starting instance's sweep of old unreferenced files leaves it to this upload
                os.utime(target)
                return sha256, False
            except FileNotFoundError:  # swept meanwhile: write it again
                pass
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".upload.")
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        os.replace(temporary, target)
        return sha256, True
