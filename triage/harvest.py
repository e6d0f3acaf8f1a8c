"""`harvest`: the lesions whose outcome is known, as a dataset in the SIIM-ISIC 2020 layout, so the loop
closes: `inspect`, `validate`, `folds` and `train-cnns` read what the clinic learnt.

    DATA/train.csv          image_name, patient_id, sex, age_approx, anatom_site_general_challenge,
                            diagnosis, benign_malignant, target (one row per lesion with an outcome)
    DATA/jpeg/train/<image_name>.jpg|.png   the uploaded image, as stored

An image is named `TRIAGE_<lesion id>`; its diagnosis is written in words the layouts' readers map
back (`melanoma`, `nevus`, ...; `benign-not-biopsied` as `unknown`, benign). Everything is written
into a temporary folder renamed into place.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from errors import DataError, RunStateError
from triage.db.engine import database_engine, require_current
from triage.db.models import Lesion
from triage.schemas import BENIGN_NOT_BIOPSIED
from triage.site import latest_outcomes, outcome_target
from triage.store import ImageStore

# Each outcome as the SIIM-ISIC 2020 layout's words, which its reader maps back (metadata.schema.DIAGNOSIS_ALIASES).
DIAGNOSIS_WORDS = {
    "MEL": "melanoma", "NV": "nevus", "BCC": "basal cell carcinoma", "AK": "actinic keratosis", "BKL": "seborrheic keratosis", "DF": "dermatofibroma",
    "VASC": "vascular lesion", "SCC": "squamous cell carcinoma", "UNK": "unknown", BENIGN_NOT_BIOPSIED: "unknown",
}


def harvest_table(session: Session) -> pd.DataFrame:
    """One row per lesion with a known outcome, in the SIIM-ISIC 2020 columns (plus lesion_id and the stored file)."""
    outcomes = latest_outcomes(session)
    columns = [Lesion.lesion_id, Lesion.patient_id, Lesion.sex, Lesion.age, Lesion.site, Lesion.image_sha256, Lesion.image_suffix]
    lesions = pd.DataFrame(session.execute(select(*columns).where(Lesion.lesion_id.in_(outcomes["lesion_id"].tolist()))).all(), columns=[c.key for c in columns])
    rows = lesions.merge(outcomes, on="lesion_id").sort_values("lesion_id")
    melanoma = outcome_target(rows["diagnosis"]).astype(int)  # every harvested lesion has an outcome
    return pd.DataFrame({
        "image_name": [f"TRIAGE_{i:08d}" for i in rows["lesion_id"]], "patient_id": rows["patient_id"].to_numpy(), "sex": rows["sex"].to_numpy(),
        "age_approx": rows["age"].to_numpy(), "anatom_site_general_challenge": rows["site"].to_numpy(),
        "diagnosis": rows["diagnosis"].map(DIAGNOSIS_WORDS).to_numpy(), "benign_malignant": melanoma.map({1: "malignant", 0: "benign"}).to_numpy(),
        "target": melanoma.to_numpy(), "lesion_id": rows["lesion_id"].to_numpy(), "image_sha256": rows["image_sha256"].to_numpy(), "image_suffix": rows["image_suffix"].to_numpy(),
    })


def harvest(session: Session, store: ImageStore, out: Path) -> pd.DataFrame:
    """Write the dataset to `out` (a new folder); its train.csv rows."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; choose a new --out or delete it.")
    table = harvest_table(session)
    if table.empty:
        raise RunStateError("no lesion has an outcome yet: enter outcomes (API, worklist or patient page) before harvesting.")
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        images = building / "jpeg" / "train"
        images.mkdir(parents=True)
        for name, sha, suffix in zip(table["image_name"], table["image_sha256"], table["image_suffix"]):
            stored = store.path(sha, suffix)
            if not stored.is_file():
                raise RunStateError(f"the image of {name} ({stored}) is missing from the image store: is --store the service's folder?")
            shutil.copyfile(stored, images / f"{name}{suffix}")
        table.drop(columns=["lesion_id", "image_sha256", "image_suffix"]).to_csv(building / "train.csv", index=False)
        if out.exists():
            out.rmdir()
        building.rename(out)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return table


def harvested(database: str, store: Path, out: Path) -> pd.DataFrame:
    """`harvest` on a database URL and an image folder."""
    engine = database_engine(database)
    require_current(engine, database)
    with Session(engine) as session:
        return harvest(session, ImageStore(store), out)
