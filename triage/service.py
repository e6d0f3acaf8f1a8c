"""The triage service's logic, without HTTP: store a patient's lesions, score the patient, keep every
score and review, list the alerts a dermatologist must see, and record every read of a patient's data.

An upload costs the new lesions' CNN passes (kept per image content and bundle, `triage.lesions`) and
then, under a lock on the patient (PostgreSQL: an advisory lock; SQLite: the database's write lock,
a bounded wait), one short transaction that re-scores the whole patient from kept inputs, writes
the new lesions and every lesion's score, and moves each lesion's pointer to its current score. Two
uploads for one patient, from one instance or two, queue on that lock: neither is refused, and the
second scores a patient that includes the first's lesions. A failed upload stores no row (its image
file, content-addressed, is swept later if nothing refers to it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from sqlalchemy import insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from cnn.outputs import class_of, fold_column, is_class_column
from ensemble.bundle import Bundle, file_sha256, load_bundle
from ensemble.explain import bundle_gradcams, overlay_png
from ensemble.predict import batch_shift_warnings, judge_lesions, lesion_inputs
from errors import DataError
from metadata.schema import canonical_table
from rundir.io import atomic_write
from rundir.layout import BundleLayout
from triage.db.engine import database_engine, migrate, ping, require_current, schema_state
from triage.db.models import Lesion, LesionInputs, Outcome, Patient, ReadRecord, Review, Score, as_utc, utc_now
from triage.errors import Busy, Invalid, NotFound, TooLarge, Unavailable
from triage.lesions import CombinedPasses, assembled_inputs, inputs_records
from triage.monitoring import bundle_figures
from triage.schemas import (
    BundleFigures,
    LesionMetadata,
    LesionOut,
    MonitoringOut,
    OperatingPointFigures,
    OutcomeIn,
    OutcomeOut,
    PatientOut,
    ReviewIn,
    ReviewOut,
    ShiftFigures,
    WorklistOut,
)
from triage.site import latest_lesions, scored_lesions
from triage.store import ImageStore
from triage.uploads import UploadLimits, checked_image, checked_patient_id, stored_file_name

LOG = logging.getLogger(__name__)
UNRECORDED = "not recorded"  # the operating point of a score from before scores named theirs
LOCK_WAIT_SECONDS = 30  # how long an upload waits for another on the same patient (PostgreSQL; SQLite's busy timeout is the same)


@dataclass(frozen=True)
class Reader:
    """Who reads, through which route, under which request: what every read of a patient's data records."""

    actor: str
    route: str
    request_id: str


class TriageService:
    """One loaded bundle, one database (at the code's schema), one image store."""

    def __init__(self, *, bundle_path: Path, database_url: str, store_dir: Path, limits: UploadLimits = UploadLimits(), batch_size: int = 32) -> None:
        self.bundle: Bundle = load_bundle(Path(bundle_path))  # checksums verified
        self.bundle_sha256 = file_sha256(BundleLayout(bundle_path).manifest)
        self.bundle_version = f"{self.bundle.manifest['created']} (format {self.bundle.manifest['format_version']})"
        self.engine = database_engine(database_url)
        if schema_state(self.engine) == "empty":  # a new database starts at the code's schema; one with data is migrated by hand
            migrate(self.engine)
        require_current(self.engine, database_url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.images = ImageStore(store_dir)
        self.limits, self.batch_size = limits, batch_size
        self._models = threading.Lock()  # one CNN pass at a time: the models are shared
        self._passes = CombinedPasses(self._records, self._models)
        self._sqlite_writer = threading.Lock()
        self._gradcams: list | None = None
        self.images_scored = 0  # images this process ran through the CNNs (each content once per bundle)
        self.on_scored: Callable[[float], None] | None = None  # told each upload's scoring seconds (the metrics' histogram)
        self.sweep_orphans()

    def ready(self) -> bool:
        """The database answers (the bundle loaded when the service was made)."""
        return ping(self.engine)

    # --- uploads -------------------------------------------------------------------------------

    def add_lesions(self, patient_id: str, uploads: list[tuple[str, bytes]], metadata: LesionMetadata, *, actor: str, reader: Reader) -> PatientOut:
        """Store the uploaded images as lesions of `patient_id` (with this request's metadata), score the
        patient, and return it with the new scores (a read of the patient, recorded)."""
        checked_patient_id(patient_id)
        if not uploads:
            raise Invalid("no image in the field `files`.")
        if len(uploads) > self.limits.max_files:
            raise TooLarge(f"{len(uploads)} images in one request; at most {self.limits.max_files}.")
        suffixes = [checked_image(name, content, self.limits) for name, content in uploads]
        # content-addressed and never deleted here: another upload may share the file (unreferenced ones: `sweep_orphans`)
        new = [
            Lesion(patient_id=patient_id, image_sha256=self.images.put(content, suffix)[0], image_suffix=suffix, file_name=stored_file_name(name),
                   uploaded_by=actor, **metadata.model_dump())
            for (name, content), suffix in zip(uploads, suffixes)
        ]
        started = time.perf_counter()
        with self.sessions() as session:  # before the lock and outside any write: the slow part, each image once per bundle
            stored = list(session.scalars(select(Lesion).where(Lesion.patient_id == patient_id)))
            computed = self._missing_inputs(session, [*stored, *new])
        try:
            with self._writer_turn(patient_id), self.sessions.begin() as session:
                self._lock_patient(session, patient_id)
                self._keep_inputs(session, computed)
                self._score_patient(session, patient_id, new, actor)
                if self.on_scored is not None:
                    self.on_scored(time.perf_counter() - started)
                return self._patient(session, patient_id, reader)
        except OperationalError as error:
            if "locked" in str(error).lower() or "lock timeout" in str(error).lower():
                raise Busy(f"patient {patient_id!r} stayed locked by other uploads for over {LOCK_WAIT_SECONDS} s; try again.") from error
            raise

    @contextlib.contextmanager
    def _writer_turn(self, patient_id: str) -> Iterator[None]:
        """SQLite has one writer at a time: this process's uploads queue for it here, in turn (a bounded
        wait), rather than poll SQLite's busy handler, which lets a late writer in first and leaves
        another waiting for seconds. PostgreSQL: nothing to wait for here (the patient's lock does)."""
        if self.engine.dialect.name != "sqlite":
            yield
            return
        if not self._sqlite_writer.acquire(timeout=LOCK_WAIT_SECONDS):
            raise Busy(f"patient {patient_id!r}: the database stayed busy with other uploads for over {LOCK_WAIT_SECONDS} s; try again.")
        try:
            yield
        finally:
            self._sqlite_writer.release()

    def _missing_inputs(self, session: Session, lesions: list[Lesion]) -> list[dict[str, object]]:
        """The CNN outputs and features (`lesion_inputs` rows) of the images not yet kept under this bundle
        (normally only the new ones; every stored one after the bundle changed), computed; nothing written."""
        shas = {lesion.image_sha256 for lesion in lesions}
        known = set(session.scalars(select(LesionInputs.image_sha256).where(LesionInputs.bundle_sha256 == self.bundle_sha256, LesionInputs.image_sha256.in_(shas))))
        todo = list(dict.fromkeys(lesion.image_sha256 for lesion in lesions if lesion.image_sha256 not in known))
        if not todo:
            return []
        suffix = {lesion.image_sha256: lesion.image_suffix for lesion in lesions}
        try:
            records = self._passes([str(self.images.path(sha, suffix[sha])) for sha in todo])
        except DataError as error:  # an image Pillow opened but the CNN pipeline cannot decode
            raise Invalid("an image could not be decoded by the models; upload it as a plain JPEG or PNG.") from error
        return [{"image_sha256": sha, "bundle_sha256": self.bundle_sha256, "computed_at": utc_now(), **record} for sha, record in zip(todo, records)]

    def _keep_inputs(self, session: Session, rows: list[dict[str, object]]) -> None:
        """Keep computed `lesion_inputs` rows (one computed by another upload meanwhile stays as it is)."""
        if rows:
            session.execute(self._insert(LesionInputs).values(rows).on_conflict_do_nothing())

    def _records(self, sources: list[str]) -> list[dict[str, object]]:
        """One CNN and feature pass over `sources` (under the models' lock, `CombinedPasses`): each image's kept record."""
        records = inputs_records(lesion_inputs(self.bundle, sources, batch_size=self.batch_size, advance=lambda n: None))
        self.images_scored += len(sources)
        return records

    def _insert(self, table: type) -> object:
        return {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[self.engine.dialect.name](table)

    def _lock_patient(self, session: Session, patient_id: str) -> None:
        """Hold the patient for this transaction: other uploads for it wait (a bounded wait), then see its lesions."""
        if self.engine.dialect.name == "postgresql":
            session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_WAIT_SECONDS}s'"))
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": zlib.crc32(patient_id.encode()) - 2**31})
        # SQLite: this first write takes the database's write lock for the transaction
        session.execute(self._insert(Patient).values(patient_id=patient_id, created_at=utc_now()).on_conflict_do_nothing())

    def _score_patient(self, session: Session, patient_id: str, new: list[Lesion], actor: str) -> None:
        """Score the patient's lesions (stored and new) from their kept inputs; write the new lesions, a
        score per lesion (one time for the whole scoring) and each lesion's pointer to it."""
        known = list(session.scalars(select(Lesion).where(Lesion.patient_id == patient_id).order_by(Lesion.lesion_id)))
        session.add_all(new)
        session.flush()
        lesions = [*known, *new]
        self._keep_inputs(session, self._missing_inputs(session, lesions))  # none unless another instance added a lesion under another bundle
        kept = {r.image_sha256: r for r in session.scalars(select(LesionInputs).where(
            LesionInputs.bundle_sha256 == self.bundle_sha256, LesionInputs.image_sha256.in_({lesion.image_sha256 for lesion in lesions})))}
        records = [{"cnn_outputs": kept[lesion.image_sha256].cnn_outputs, "image_features": kept[lesion.image_sha256].image_features,
                    "diagnosis": kept[lesion.image_sha256].diagnosis} for lesion in lesions]
        predictions, _ = judge_lesions(self.bundle.stack, self._rows(lesions), assembled_inputs(self.bundle, records))
        lesion_ids = [lesion.lesion_id for lesion in lesions]
        # one multi-row INSERT ... RETURNING, not an ORM object per lesion: this part runs for every lesion of the patient
        score_ids = session.scalars(insert(Score).returning(Score.score_id, sort_by_parameter_order=True), self._score_values(lesion_ids, predictions, actor)).all()
        session.execute(update(Lesion), [{"lesion_id": lesion_id, "latest_score_id": score_id} for lesion_id, score_id in zip(lesion_ids, score_ids)])

    def _rows(self, lesions: list[Lesion]) -> pd.DataFrame:
        """The canonical rows of one patient's lesions, in their order (`image_id`: the position)."""
        return canonical_table(
            {
                "image_id": pd.Series([f"lesion{i}" for i in range(len(lesions))], dtype="string"),
                "patient_id": pd.Series([lesion.patient_id for lesion in lesions], dtype="string"),
                "age": pd.Series([lesion.age for lesion in lesions], dtype=float),
                "sex": pd.Series([lesion.sex for lesion in lesions], dtype="string"),
                "site": pd.Series([lesion.site for lesion in lesions], dtype="string"),
                "split": pd.Series("test", index=range(len(lesions)), dtype="string"),
            }
        )

    def _score_values(self, lesion_ids: list[int], predictions: pd.DataFrame, actor: str) -> list[dict[str, object]]:
        """The `scores` rows of one scoring: a row per lesion (in `predictions`' order), one time for all."""
        classes = predictions[[c for c in predictions.columns if is_class_column(c)]].astype(float)
        diagnoses = classes.rename(columns=class_of).to_dict("records")
        common = {"bundle_sha256": self.bundle_sha256, "bundle_version": self.bundle_version, "scored_by": actor, "scored_at": utc_now()}
        return [
            {**common, "lesion_id": lesion_id, "melanoma_probability": float(probability), "alert": bool(alert), "alert_threshold": float(threshold),
             "rank_in_patient": int(rank), "diagnosis": diagnosis, "missing_metadata": str(missing).split(), "pattern": str(pattern), "operating_point": str(point)}
            for lesion_id, probability, alert, threshold, rank, diagnosis, missing, pattern, point in zip(
                lesion_ids, predictions["melanoma_probability"], predictions["alert"], predictions["alert_threshold"], predictions["rank_in_patient"],
                diagnoses, predictions["missing_metadata"], predictions["pattern"], predictions["operating_point"])
        ]

    def sweep_orphans(self, older_than_seconds: float = 3600) -> int:
        """Delete stored images no lesion refers to (left by failed uploads), if older than the given age."""
        with self.sessions() as session:
            referenced = {f"{sha}{suffix}" for sha, suffix in session.execute(select(Lesion.image_sha256, Lesion.image_suffix)).all()}
        cutoff = time.time() - older_than_seconds
        orphans = [p for p in self.images.stored() if p.name not in referenced and p.stat().st_mtime < cutoff]
        for path in orphans:
            path.unlink(missing_ok=True)
        return len(orphans)

    # --- reads (each one recorded) ---------------------------------------------------------------

    @staticmethod
    def _record(session: Session, reader: Reader, pairs: list[tuple[str | None, int | None]]) -> None:
        session.add_all([ReadRecord(actor=reader.actor, route=reader.route, request_id=reader.request_id, patient_id=p, lesion_id=lesion, read_at=utc_now())
                         for p, lesion in pairs])

    def patient(self, patient_id: str, *, reader: Reader) -> PatientOut:
        """A patient's lesions with their current scores, riskiest first (the read recorded)."""
        checked = patient_id if len(patient_id) <= 128 and "\x00" not in patient_id else None
        with self.sessions.begin() as session:
            if checked is None or session.get(Patient, checked) is None:
                raise NotFound(f"no patient {patient_id[:128]!r}.")
            return self._patient(session, checked, reader)

    def _patient(self, session: Session, patient_id: str, reader: Reader) -> PatientOut:
        found = session.execute(
            select(Lesion, Score).where(Lesion.patient_id == patient_id).outerjoin(Score, Score.score_id == Lesion.latest_score_id)
            .options(selectinload(Lesion.reviews), selectinload(Lesion.outcomes))
        ).all()
        lesions = sorted((lesion_out(lesion, score) for lesion, score in found), key=lambda out: (out.rank_in_patient or 10**9, out.lesion_id))
        self._record(session, reader, [(patient_id, None)])
        return PatientOut(patient_id=patient_id, lesions=lesions)

    def worklist(self, status: str, *, reader: Reader) -> WorklistOut:
        """Alerted lesions (current score) across patients, highest risk first: without a review (`open`) or with one (`reviewed`)."""
        with self.sessions.begin() as session:
            reviewed = select(Review.lesion_id).distinct()
            query = (
                select(Lesion, Score).join(Score, Score.score_id == Lesion.latest_score_id).where(Score.alert.is_(True))
                .where(Lesion.lesion_id.in_(reviewed) if status == "reviewed" else Lesion.lesion_id.not_in(reviewed))
                .order_by(Score.melanoma_probability.desc(), Lesion.lesion_id).options(selectinload(Lesion.reviews), selectinload(Lesion.outcomes))
            )
            lesions = [lesion_out(lesion, score) for lesion, score in session.execute(query).all()]
            self._record(session, reader, [(patient, None) for patient in dict.fromkeys(lesion.patient_id for lesion in lesions)])
        return WorklistOut(status=status, lesions=lesions)

    def review(self, lesion_id: int, review: ReviewIn, *, actor: str) -> ReviewOut:
        """Record a dermatologist's outcome for a lesion (added to its history, never overwritten), with
        the score they saw: `score_id` (one of the lesion's), or its current one when not given."""
        with self.sessions.begin() as session:
            lesion = self._lesion(session, lesion_id)
            score_id = review.score_id if review.score_id is not None else lesion.latest_score_id
            if review.score_id is not None and session.scalar(select(Score.lesion_id).where(Score.score_id == score_id)) != lesion_id:
                raise NotFound(f"no score {review.score_id} of lesion {lesion_id}.")
            row = Review(lesion_id=lesion_id, score_id=score_id, outcome=review.outcome, note=review.note, reviewed_by=actor, reviewed_at=utc_now())
            session.add(row)
            session.flush()
            return review_out(row)

    # --- monitoring -----------------------------------------------------------------------------

    def monitoring(self, *, window: int = 500, n_boot: int = 1000, seed: int = 0) -> MonitoringOut:
        """Each bundle's operating points on this clinic's lesions (`triage.monitoring`), and the latest
        `window` uploads against what the serving bundle saw out of fold."""
        with self.sessions() as session:
            scored = scored_lesions(session)
            recent = latest_lesions(session, self.bundle_sha256, count=window)
        scored = scored.assign(operating_point=scored["operating_point"].fillna(UNRECORDED))
        bundles = [
            BundleFigures(bundle_sha256=sha, bundle_version=version, serving=sha == self.bundle_sha256, operating_points=[
                OperatingPointFigures(**figures)
                for figures in bundle_figures(rows, self.bundle.operating_points if sha == self.bundle_sha256 else {}, n_boot=n_boot, seed=seed)
            ])
            for (sha, version), rows in scored.groupby(["bundle_sha256", "bundle_version"], sort=False)
        ]
        flagged = any(point.flags for bundle in bundles if bundle.serving for point in bundle.operating_points)
        return MonitoringOut(bundles=bundles, shift=ShiftFigures(window_lesions=len(recent), warnings=self._shift_warnings(recent)), flagged=flagged)

    def _shift_warnings(self, recent: pd.DataFrame) -> list[str]:
        """`predict`'s batch-shift warnings for the latest uploads (images, CNN scores, missing metadata, alert rate)."""
        if recent.empty:
            return []
        outputs = {m.name: pd.DataFrame({fold_column(f): [r[m.name][str(f)] for r in recent["cnn_outputs"]] for f in self.bundle.stack.folds}) for m in self.bundle.cnns}
        statistics = [r for r in recent["image_statistics"] if r is not None]
        return batch_shift_warnings(
            self.bundle, recent, predictions=recent[["alert", "operating_point"]], cnn_scores=self.bundle.stack.cnn_scores(outputs),
            image_stats=pd.DataFrame(statistics) if statistics else None,
        )

    def record_outcome(self, lesion_id: int, outcome: OutcomeIn, *, actor: str) -> OutcomeOut:
        """Add a lesion's ground truth (its history is kept; the latest counts), beside the review. The
        diagnosis is a unified class (`metadata.schema.DIAGNOSES`: the bundle's and any other a site
        meets), or benign without a biopsy."""
        if outcome.diagnosed_on > utc_now().date():
            raise Invalid(f"diagnosed_on={outcome.diagnosed_on.isoformat()} is in the future.")
        with self.sessions.begin() as session:
            self._lesion(session, lesion_id)
            row = Outcome(lesion_id=lesion_id, diagnosis=outcome.diagnosis, diagnosed_on=outcome.diagnosed_on, note=outcome.note, entered_by=actor, entered_at=utc_now())
            session.add(row)
            session.flush()
            return outcome_out(row)

    @staticmethod
    def _lesion(session: Session, lesion_id: int) -> Lesion:
        lesion = session.get(Lesion, lesion_id)
        if lesion is None:
            raise NotFound(f"no lesion {lesion_id}.")
        return lesion

    def _stored_image(self, lesion: Lesion) -> Path:
        path = self.images.path(lesion.image_sha256, lesion.image_suffix)
        if not path.is_file():
            raise Unavailable(f"lesion {lesion.lesion_id}: its image {path} is not in the image store")
        return path

    def image(self, lesion_id: int, *, reader: Reader) -> tuple[bytes, str]:
        """The stored image of a lesion and its media type (the read recorded)."""
        with self.sessions.begin() as session:
            lesion = self._lesion(session, lesion_id)
            self._record(session, reader, [(lesion.patient_id, lesion_id)])
        return self._stored_image(lesion).read_bytes(), "image/png" if lesion.image_suffix == ".png" else "image/jpeg"

    def gradcam(self, lesion_id: int, *, reader: Reader) -> bytes:
        """The lesion's Grad-CAM overlay (mean over every fold model), computed once per image and bundle (the read recorded)."""
        with self.sessions.begin() as session:
            lesion = self._lesion(session, lesion_id)
            self._record(session, reader, [(lesion.patient_id, lesion_id)])
        cached = self.images.root / "gradcam" / f"{lesion.image_sha256}-{self.bundle_sha256[:16]}.png"
        if not cached.exists():
            with self._models:
                if self._gradcams is None:
                    self._gradcams = bundle_gradcams(self.bundle)
                png = overlay_png(self._gradcams, self._stored_image(lesion).read_bytes())
            atomic_write(cached, lambda temporary: temporary.write_bytes(png))
        return cached.read_bytes()


def review_out(review: Review) -> ReviewOut:
    return ReviewOut(review_id=review.review_id, lesion_id=review.lesion_id, score_id=review.score_id, outcome=review.outcome, note=review.note,
                     reviewed_at=as_utc(review.reviewed_at), reviewed_by=review.reviewed_by)


def lesion_out(lesion: Lesion, score: Score | None) -> LesionOut:
    return LesionOut(
        lesion_id=lesion.lesion_id, patient_id=lesion.patient_id, image_sha256=lesion.image_sha256, file_name=lesion.file_name,
        age=lesion.age, sex=lesion.sex, site=lesion.site, uploaded_at=as_utc(lesion.uploaded_at),
        melanoma_probability=None if score is None else score.melanoma_probability,
        alert=None if score is None else bool(score.alert),
        alert_threshold=None if score is None else score.alert_threshold,
        rank_in_patient=None if score is None else score.rank_in_patient,
        diagnosis={} if score is None else dict(score.diagnosis),
        missing_metadata=[] if score is None else list(score.missing_metadata),
        scored_at=None if score is None else as_utc(score.scored_at),
        score_id=None if score is None else score.score_id,
        bundle_sha256=None if score is None else score.bundle_sha256,
        reviews=[review_out(r) for r in lesion.reviews],
        outcome=outcome_out(lesion.outcomes[-1]) if lesion.outcomes else None,
    )


def outcome_out(outcome: Outcome) -> OutcomeOut:
    return OutcomeOut(outcome_id=outcome.outcome_id, lesion_id=outcome.lesion_id, diagnosis=outcome.diagnosis, diagnosed_on=outcome.diagnosed_on,
                      note=outcome.note, entered_at=as_utc(outcome.entered_at), entered_by=outcome.entered_by)
