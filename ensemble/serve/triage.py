"""The triage service's logic, without HTTP: store a patient's lesions, re-score all of them with the
bundle, keep every score and review, list the alerts a dermatologist must see.

A patient's lesions are always scored together: the stack's patient-context features (how a lesion
stands out from the same patient's others) change when a lesion is added, so an upload re-scores
the patient and every lesion gets a new score row. The new lesions and all the scores are one
transaction: a failed upload stores no row (its image file, content-addressed, is swept later if
nothing refers to it). Uploads for one patient are serialised in the process; across instances the
write transaction locks the patient's row and checks that the lesions it scored are still all the
patient has (else it scores again), so two uploads at once lose no lesion and leave ranks that agree.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, sessionmaker

from cnn.outputs import class_of, is_class_column
from ensemble.bundle import file_sha256, load_bundle
from ensemble.explain import bundle_gradcams, overlay_png
from ensemble.predict import score_patients
from ensemble.serve.store import ImageStore, Lesion, Patient, Review, Score, database_engine, utc_now
from errors import DataError, UserError
from metadata.formats import SEX_ALIASES
from metadata.schema import MAX_AGE, SEXES, SITE_ALIASES, SITES, canonical_table
from rundir.io import atomic_write
from rundir.layout import BundleLayout

LOG = logging.getLogger(__name__)
REVIEW_OUTCOMES = ("biopsy", "benign", "follow-up")
PATIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # safe in a URL path and a file name
WRITE_ATTEMPTS = 5  # scorings of one upload when other instances keep adding lesions to the patient
# what the CNN pipeline decodes, by the content's own signature (MPO: a camera's JPEG with a multi-picture marker)
IMAGE_FORMATS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png"}
MAX_NOTE = 4000  # characters of a review note


class _LesionsChanged(Exception):
    """Another instance added a lesion to the patient between scoring and writing."""


class NotFound(LookupError):
    """No such patient, lesion or score of that lesion (HTTP 404)."""


class StoreUnavailable(RuntimeError):
    """A stored lesion's image is not in the image store (swept, or the share is not mounted): the server's fault (HTTP 503)."""


class UploadError(UserError):
    """An upload refused before anything is stored; `status` is the HTTP answer (413 too large, 422 invalid)."""

    def __init__(self, status: int, message: str, allowed: list[str] | None = None) -> None:
        super().__init__(message)
        self.status, self.allowed = status, allowed


@dataclass(frozen=True)
class UploadLimits:
    """Per-file bytes and pixels (a decompression bomb has few bytes and very many pixels), files per request."""

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_files: int = 32


def checked_image(name: str, content: bytes, limits: UploadLimits) -> str:
    """The stored suffix of an uploaded image whose content is a decodable JPEG or PNG within the limits."""
    if len(content) > limits.max_bytes:
        raise UploadError(413, f"{name}: {len(content)} bytes, more than the {limits.max_bytes} allowed per image.")
    try:
        with Image.open(io.BytesIO(content)) as image:
            kind, (width, height) = image.format, image.size
            if width * height > limits.max_pixels:
                raise UploadError(413, f"{name}: {width} x {height} pixels, more than the {limits.max_pixels} allowed (a decompression bomb?).")
            if kind not in IMAGE_FORMATS:
                raise UploadError(422, f"{name}: a {kind} image; upload JPEG or PNG.")
            image.load()  # a truncated or corrupt file fails here, not later inside the CNNs
    except UploadError:
        raise
    except Image.DecompressionBombError as error:  # PIL's own guard, far above ours
        raise UploadError(413, f"{name}: {error}") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise UploadError(422, f"{name}: not a readable JPEG or PNG image ({error}).") from error
    return IMAGE_FORMATS[kind]


def checked_patient_id(patient_id: str) -> str:
    if not PATIENT_ID.fullmatch(patient_id):
        raise UploadError(422, f"patient id {patient_id[:140]!r}: use 1-128 letters, digits, '.', '_' or '-'.")
    return patient_id


def _vocabulary_value(field: str, value: str | None, aliases: dict[str, str], allowed: tuple[str, ...]) -> str | None:
    if value is None or not value.strip():
        return None
    found = aliases.get(value.strip().lower(), aliases.get(value.strip()))
    if found is None:
        raise UploadError(422, f"{field}={value!r} is not a known value; allowed: {list(allowed)} (or leave it empty).", list(allowed))
    return found


def checked_metadata(age: str | float | None, sex: str | None, site: str | None) -> dict[str, object]:
    """Age in years (0-120), sex and site in the bundle's vocabularies; empty means missing."""
    years = None
    if age is not None and str(age).strip():
        try:
            years = float(age)
        except ValueError as error:
            raise UploadError(422, f"age={age!r} is not a number of years.") from error
        if not 0 <= years <= MAX_AGE:
            raise UploadError(422, f"age={age!r} is outside 0-{MAX_AGE} years.")
    return {
        "age": years,
        "sex": _vocabulary_value("sex", sex, SEX_ALIASES, SEXES),
        "site": _vocabulary_value("site", site, SITE_ALIASES, SITES),
    }


def _latest_scores(session: Session) -> object:
    """Subquery: each lesion's newest score id."""
    return select(Score.lesion_id, func.max(Score.score_id).label("score_id")).group_by(Score.lesion_id).subquery()


def lesion_json(lesion: Lesion, score: Score | None) -> dict[str, object]:
    return {
        "lesion_id": lesion.lesion_id,
        "patient_id": lesion.patient_id,
        "image_sha256": lesion.image_sha256,
        "file_name": lesion.file_name,
        "age": lesion.age, "sex": lesion.sex, "site": lesion.site,
        "uploaded_at": lesion.uploaded_at.isoformat(),
        "melanoma_probability": None if score is None else score.melanoma_probability,
        "alert": None if score is None else bool(score.alert),
        "rank_in_patient": None if score is None else score.rank_in_patient,
        "diagnosis": {} if score is None else score.diagnosis,
        "missing_metadata": [] if score is None else score.missing_metadata,
        "scored_at": None if score is None else score.scored_at.isoformat(),
        "score_id": None if score is None else score.score_id,
        "reviews": [
            {"outcome": r.outcome, "note": r.note, "reviewed_at": r.reviewed_at.isoformat(), "reviewed_by": r.reviewed_by, "score_id": r.score_id}
            for r in lesion.reviews
        ],
    }


class TriageService:
    """One loaded bundle, one database, one image store."""

    def __init__(self, bundle_path: Path, database_url: str, store_dir: Path, *, limits: UploadLimits = UploadLimits(), batch_size: int = 32) -> None:
        self.bundle = load_bundle(Path(bundle_path))  # checksums verified
        self.bundle_sha256 = file_sha256(BundleLayout(bundle_path).manifest)
        self.bundle_version = f"{self.bundle.manifest['created']} (format {self.bundle.manifest['format_version']})"
        self.engine = database_engine(database_url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.images = ImageStore(store_dir)
        self.limits, self.batch_size = limits, batch_size
        # one lock per patient with an upload in flight (weakly held: the table does not grow with the patients served)
        self._patient_locks: weakref.WeakValueDictionary[str, threading.Lock] = weakref.WeakValueDictionary()
        self._locks_guard = threading.Lock()
        self._scoring = threading.Lock()  # one scoring at a time: the models are shared
        self._gradcams: list | None = None
        self.sweep_orphans()

    def ready(self) -> bool:
        """The database answers (the bundle loaded when the service was made)."""
        with self.engine.connect() as connection:
            return connection.execute(text("SELECT 1")).scalar() == 1

    def _patient_lock(self, patient_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._patient_locks.setdefault(patient_id, threading.Lock())

    def add_lesions(
        self, patient_id: str, uploads: list[tuple[str, bytes]], *, age: str | None = None, sex: str | None = None,
        site: str | None = None, actor: str = "anonymous",
    ) -> dict[str, object]:
        """Store the uploaded images as lesions of `patient_id` (with this request's metadata), re-score
        all the patient's lesions, and return the patient with the new scores.

        The patient's lesions are scored outside any database transaction (the models take a while),
        then the new lesions and every score are written in one short transaction, which first checks
        that no other instance added a lesion meanwhile (it scores again if one did).
        """
        checked_patient_id(patient_id)
        if not uploads:
            raise UploadError(422, "no image in the field `files`.")
        if len(uploads) > self.limits.max_files:
            raise UploadError(413, f"{len(uploads)} images in one request; at most {self.limits.max_files}.")
        suffixes = [checked_image(name, content, self.limits) for name, content in uploads]
        metadata = checked_metadata(age, sex, site)
        # content-addressed and never deleted here: another upload may share the file (unreferenced ones: `sweep_orphans`)
        new = [
            Lesion(patient_id=patient_id, image_sha256=self.images.put(content, suffix)[0], image_suffix=suffix, file_name=name.replace("\x00", "")[:255],
                   uploaded_by=actor, **metadata)
            for (name, content), suffix in zip(uploads, suffixes)
        ]
        with self._patient_lock(patient_id):
            for _ in range(WRITE_ATTEMPTS):
                with self.sessions() as session:
                    known = session.scalars(select(Lesion).where(Lesion.patient_id == patient_id).order_by(Lesion.lesion_id)).all()
                predictions = self._score([*known, *new])
                if self._write_scored(patient_id, [lesion.lesion_id for lesion in known], new, predictions, actor=actor):
                    return self.patient(patient_id)
        raise UploadError(503, f"patient {patient_id!r} is being updated by other uploads; try again.")

    def _ensure_patient(self, session: Session, patient_id: str) -> None:
        """Insert the patient if it is new (a no-op when another instance just did), then lock its row for update."""
        dialect = self.engine.dialect.name
        insert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}.get(dialect)
        if insert is not None:
            session.execute(insert(Patient).values(patient_id=patient_id, created_at=utc_now()).on_conflict_do_nothing())
        elif session.get(Patient, patient_id) is None:
            session.add(Patient(patient_id=patient_id))
            session.flush()
        session.get(Patient, patient_id, with_for_update=True)

    def _write_scored(self, patient_id: str, known_ids: list[int], new: list[Lesion], predictions: pd.DataFrame, *, actor: str) -> bool:
        """Write the new lesions and every lesion's score in one transaction; False (nothing written)
        when the patient's lesions changed since they were scored."""
        try:
            with self.sessions.begin() as session:
                self._ensure_patient(session, patient_id)
                current = session.scalars(select(Lesion.lesion_id).where(Lesion.patient_id == patient_id).order_by(Lesion.lesion_id)).all()
                if list(current) != known_ids:
                    raise _LesionsChanged
                self._add_scored(session, known_ids, new, predictions, actor=actor)
        except _LesionsChanged:
            return False
        return True

    def _add_scored(self, session: Session, known_ids: list[int], new: list[Lesion], predictions: pd.DataFrame, *, actor: str) -> None:
        session.add_all(new)
        session.flush()
        scored_at = utc_now()  # one time for the whole scoring: the patient's latest scores belong together
        lesion_ids = [*known_ids, *(lesion.lesion_id for lesion in new)]
        for lesion_id, row in zip(lesion_ids, predictions.itertuples()):
            session.add(self._score_row(lesion_id, row, actor, scored_at))

    def sweep_orphans(self, older_than_seconds: float = 3600) -> int:
        """Delete stored images no lesion refers to (left by failed uploads), if older than the given age."""
        with self.sessions() as session:
            referenced = {f"{sha}{suffix}" for sha, suffix in session.execute(select(Lesion.image_sha256, Lesion.image_suffix)).all()}
        cutoff = time.time() - older_than_seconds
        orphans = [p for p in self.images.root.glob("??/*") if p.is_file() and p.name not in referenced and p.stat().st_mtime < cutoff]
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)

    def _score(self, lesions: list[Lesion]) -> pd.DataFrame:
        """The bundle's predictions for one patient's lesions (stored and new), in the lesions' order."""
        keys = [f"lesion{i}" for i in range(len(lesions))]
        rows = canonical_table(
            {
                "image_id": pd.Series(keys, dtype="string"),
                "patient_id": pd.Series([lesion.patient_id for lesion in lesions], dtype="string"),
                "image_path": pd.Series([str(self.images.path(lesion.image_sha256, lesion.image_suffix)) for lesion in lesions], dtype="string"),
                "age": pd.Series([lesion.age for lesion in lesions], dtype=float),
                "sex": pd.Series([lesion.sex for lesion in lesions], dtype="string"),
                "site": pd.Series([lesion.site for lesion in lesions], dtype="string"),
                "split": pd.Series("test", index=range(len(lesions)), dtype="string"),
            }
        )
        try:
            with self._scoring:
                predictions = score_patients(self.bundle, rows, batch_size=self.batch_size, advance=lambda n: None).predictions
        except DataError as error:  # an image Pillow opened but the CNN pipeline cannot decode
            raise UploadError(422, str(error)) from error
        return predictions.set_index("image_id").loc[keys]

    def _score_row(self, lesion_id: int, row: object, actor: str, scored_at: datetime) -> Score:
        classes = {class_of(name): float(getattr(row, name)) for name in row._fields if is_class_column(name)}
        return Score(
            lesion_id=lesion_id, bundle_sha256=self.bundle_sha256, bundle_version=self.bundle_version,
            melanoma_probability=float(row.melanoma_probability), alert=bool(row.alert), alert_threshold=float(row.alert_threshold),
            rank_in_patient=int(row.rank_in_patient), diagnosis=classes, missing_metadata=str(row.missing_metadata).split(), scored_by=actor, scored_at=scored_at,
        )

    def patient(self, patient_id: str) -> dict[str, object] | None:
        """A patient's lesions with their latest scores, riskiest first; None for an unknown patient."""
        if not PATIENT_ID.fullmatch(patient_id):  # no such id can have been stored
            return None
        with self.sessions() as session:
            if session.get(Patient, patient_id) is None:
                return None
            latest = _latest_scores(session)
            found = session.execute(
                select(Lesion, Score).where(Lesion.patient_id == patient_id)
                .outerjoin(latest, latest.c.lesion_id == Lesion.lesion_id).outerjoin(Score, Score.score_id == latest.c.score_id)
            ).all()
            lesions = [lesion_json(lesion, score) for lesion, score in found]
        lesions.sort(key=lambda lesion: (lesion["rank_in_patient"] or 10**9, lesion["lesion_id"]))
        return {"patient_id": patient_id, "lesions": lesions}

    def worklist(self, status: str = "open") -> list[dict[str, object]]:
        """Alerted lesions (latest score) across patients, highest risk first: without a review (`open`) or with one (`reviewed`)."""
        if status not in ("open", "reviewed"):
            raise UploadError(422, f"status={status!r}: choose open or reviewed.")
        with self.sessions() as session:
            latest = _latest_scores(session)
            reviewed = select(Review.lesion_id).distinct()
            query = (
                select(Lesion, Score).join(latest, latest.c.lesion_id == Lesion.lesion_id).join(Score, Score.score_id == latest.c.score_id)
                .where(Score.alert.is_(True))
                .where(Lesion.lesion_id.in_(reviewed) if status == "reviewed" else Lesion.lesion_id.not_in(reviewed))
                .order_by(Score.melanoma_probability.desc(), Lesion.lesion_id)
            )
            return [lesion_json(lesion, score) for lesion, score in session.execute(query).all()]

    def review(self, lesion_id: int, outcome: str, *, note: str = "", actor: str = "anonymous", score_id: int | None = None) -> dict[str, object]:
        """Record a dermatologist's outcome for a lesion (added to its history, never overwritten), with
        the score they saw: `score_id` (one of the lesion's), or its latest when not given."""
        if outcome not in REVIEW_OUTCOMES:
            raise UploadError(422, f"outcome={outcome!r}: choose one of {list(REVIEW_OUTCOMES)}.")
        if len(note) > MAX_NOTE or "\x00" in note:
            raise UploadError(422, f"note: at most {MAX_NOTE} characters, and no NUL character.")
        with self.sessions.begin() as session:
            self._lesion(session, lesion_id)
            # the score the dermatologist saw: its row names the bundle (hash and version) behind the alert
            if score_id is None:
                score_id = session.scalar(select(func.max(Score.score_id)).where(Score.lesion_id == lesion_id))
            elif session.scalar(select(Score.lesion_id).where(Score.score_id == score_id)) != lesion_id:
                raise NotFound(f"no score {score_id} of lesion {lesion_id}.")
            session.add(Review(lesion_id=lesion_id, score_id=score_id, outcome=outcome, note=note, reviewed_by=actor))
        return {"lesion_id": lesion_id, "score_id": score_id, "outcome": outcome, "note": note, "reviewed_by": actor}

    @staticmethod
    def _lesion(session: Session, lesion_id: int) -> Lesion:
        lesion = session.get(Lesion, lesion_id)
        if lesion is None:
            raise NotFound(f"no lesion {lesion_id}.")
        return lesion

    def _stored_image(self, lesion: Lesion) -> Path:
        path = self.images.path(lesion.image_sha256, lesion.image_suffix)
        if not path.is_file():
            LOG.error("lesion %s: its image %s is not in the image store", lesion.lesion_id, path)
            raise StoreUnavailable(f"the image of lesion {lesion.lesion_id} is unavailable on this server; its administrator has the details.")
        return path

    def image_file(self, lesion_id: int) -> tuple[Path, str]:
        """The stored image of a lesion and its media type."""
        with self.sessions() as session:
            lesion = self._lesion(session, lesion_id)
        return self._stored_image(lesion), "image/png" if lesion.image_suffix == ".png" else "image/jpeg"

    def gradcam_png(self, lesion_id: int) -> bytes:
        """The lesion's Grad-CAM overlay (mean over every fold model), computed once per image and bundle."""
        with self.sessions() as session:
            lesion = self._lesion(session, lesion_id)
        cached = self.images.root / "gradcam" / f"{lesion.image_sha256}-{self.bundle_sha256[:16]}.png"
        if not cached.exists():
            with self._scoring:
                if self._gradcams is None:
                    self._gradcams = bundle_gradcams(self.bundle)
                png = overlay_png(self._gradcams, self._stored_image(lesion).read_bytes())
            atomic_write(cached, lambda temporary: temporary.write_bytes(png))
        return cached.read_bytes()
