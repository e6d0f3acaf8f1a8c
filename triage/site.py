"""What a clinic's database says about its own patients, as tables: each lesion's latest score under each
bundle, its latest outcome, and the lesions an alert can be judged on (monitoring, `recalibrate`,
`harvest`). Reads only; each function takes an open session."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ensemble.bundle import file_sha256
from metadata.schema import targets_from_diagnosis
from rundir.layout import BundleLayout
from triage.db.engine import database_engine, require_current
from triage.db.models import Lesion, LesionInputs, Outcome, Score


def outcome_target(diagnosis: pd.Series) -> pd.Series:
    """1 for a melanoma outcome, 0 for any other, NaN where none is known."""
    return targets_from_diagnosis(diagnosis).astype(float)


def latest_outcomes(session: Session) -> pd.DataFrame:
    """Each lesion's latest outcome: lesion_id, diagnosis, diagnosed_on, entered_by."""
    latest = select(func.max(Outcome.outcome_id)).group_by(Outcome.lesion_id)
    rows = session.execute(select(Outcome.lesion_id, Outcome.diagnosis, Outcome.diagnosed_on, Outcome.entered_by).where(Outcome.outcome_id.in_(latest))).all()
    return pd.DataFrame(rows, columns=["lesion_id", "diagnosis", "diagnosed_on", "entered_by"])


def scored_lesions(session: Session, bundle_sha256: str | None = None) -> pd.DataFrame:
    """Each lesion's latest score under each bundle (or one bundle), with its patient and latest outcome
    (`target`: 1 melanoma, 0 not, NaN unknown)."""
    latest = select(func.max(Score.score_id)).group_by(Score.lesion_id, Score.bundle_sha256)
    if bundle_sha256 is not None:
        latest = latest.where(Score.bundle_sha256 == bundle_sha256)
    columns = [Score.lesion_id, Lesion.patient_id, Score.bundle_sha256, Score.bundle_version, Score.operating_point, Score.pattern, Score.alert,
               Score.melanoma_probability, Score.alert_threshold, Score.score_id]
    rows = session.execute(select(*columns).join(Lesion, Lesion.lesion_id == Score.lesion_id).where(Score.score_id.in_(latest))).all()
    scored = pd.DataFrame(rows, columns=[c.key for c in columns]).merge(latest_outcomes(session), on="lesion_id", how="left")
    return scored.assign(alert=scored["alert"].astype(int), target=outcome_target(scored["diagnosis"]))


def latest_lesions(session: Session, bundle_sha256: str, *, count: int) -> pd.DataFrame:
    """The `count` latest uploaded lesions: metadata, current alert and operating point, and what the
    bundle's models said about their images (kept inputs: CNN outputs, image statistics)."""
    query = (
        select(Lesion.lesion_id, Lesion.age, Lesion.sex, Lesion.site, Score.alert, Score.operating_point, LesionInputs.cnn_outputs, LesionInputs.image_statistics)
        .join(Score, Score.score_id == Lesion.latest_score_id)
        .join(LesionInputs, (LesionInputs.image_sha256 == Lesion.image_sha256) & (LesionInputs.bundle_sha256 == bundle_sha256))
        .order_by(Lesion.lesion_id.desc()).limit(count)
    )
    rows = session.execute(query).all()
    return pd.DataFrame(rows, columns=["lesion_id", "age", "sex", "site", "alert", "operating_point", "cnn_outputs", "image_statistics"])



def bundle_outcomes(database: str, bundle: Path) -> pd.DataFrame:
    """The site table `recalibrate` takes: the lesions a bundle scored (their latest score under it) with known outcomes."""
    engine = database_engine(database)
    require_current(engine, database)
    with Session(engine) as session:
        scored = scored_lesions(session, file_sha256(BundleLayout(bundle).manifest))
    return scored[scored["target"].notna()][["patient_id", "operating_point", "melanoma_probability", "target"]]
