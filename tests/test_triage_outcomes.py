"""Ground truth in the record, monitoring against the promise, local recalibration, and harvesting a
clinic's outcomes as a dataset: on a small synthetic site scored through the service's API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from typer.testing import CliRunner

from cli import app as cli_app
from evaluation.operating_point import sensitivity_at, specificity_at, threshold_for_sensitivity
from fusion.missingness import PlattCalibration
from triage.db.engine import database_engine
from triage.db.models import Score
from triage.http.app import create_app
from triage.monitoring import SENSITIVITY_FLAG
from triage.settings import Settings

SECRET = "outcome-" + "z" * 24
AUTH = {"Authorization": f"Bearer {SECRET}"}
RUNNER = CliRunner(env={"COLUMNS": "300"})


@pytest.fixture(scope="module")
def site_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clinic's patients: a synthetic cohort the bundle never saw (another seed)."""
    from conftest import synthetic_cohort

    return synthetic_cohort(tmp_path_factory, "site", patients=120, image_size=32, seed=23)


@pytest.fixture(scope="module")
def site(bundle_dir: Path, site_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every training image of the site uploaded through the API (patient by patient, with metadata);
    the service, its client, and each lesion's label."""
    folder = tmp_path_factory.mktemp("site_service")
    settings = Settings(bundle=bundle_dir, database=f"sqlite:///{folder / 'db.sqlite'}", store=folder / "store", tokens=f"dr-site={SECRET}")
    client = TestClient(create_app(settings))
    train = pd.read_csv(site_cohort / "train.csv")
    labels = {}
    for patient, rows in train.groupby("patient_id"):
        files = [("files", (f"{n}.jpg", (site_cohort / "jpeg" / "train" / f"{n}.jpg").read_bytes(), "image/jpeg")) for n in rows["image_name"]]
        first = rows.iloc[0]
        form = {key: str(first[column]) for key, column in (("age", "age_approx"), ("sex", "sex"), ("site", "anatom_site_general_challenge")) if pd.notna(first[column])}
        answer = client.post(f"/api/v1/patients/{patient}/lesions", headers=AUTH, files=files, data=form)
        assert answer.status_code == 200, answer.text
        for lesion in answer.json()["lesions"]:
            labels[lesion["lesion_id"]] = int(rows.set_index("image_name").loc[lesion["file_name"].removesuffix(".jpg"), "target"])
    return {"client": client, "settings": settings, "labels": labels, "folder": folder}


def _enter_outcomes(client: TestClient, outcomes: dict[int, str]) -> None:
    for lesion_id, diagnosis in outcomes.items():
        answer = client.post(f"/api/v1/lesions/{lesion_id}/outcome", headers=AUTH, json={"diagnosis": diagnosis, "diagnosed_on": "2026-11-30"})
        assert answer.status_code == 200, answer.text


def _serving(client: TestClient) -> list[dict]:
    monitoring = client.get("/api/v1/monitoring", headers=AUTH).json()
    return [p for bundle in monitoring["bundles"] if bundle["serving"] for p in bundle["operating_points"]]


def test_outcomes_are_kept_beside_reviews_and_checked(site: dict) -> None:
    client = site["client"]
    lesion = next(iter(site["labels"]))
    assert client.post(f"/api/v1/lesions/{lesion}/outcome", headers=AUTH, json={"diagnosis": "NV", "diagnosed_on": "2026-11-01"}).status_code == 200
    kept = client.post(f"/api/v1/lesions/{lesion}/outcome", headers=AUTH, json={"diagnosis": "benign-not-biopsied", "diagnosed_on": "2026-11-20"})
    assert kept.status_code == 200 and kept.json()["entered_by"] == "dr-site"
    patient = client.get(f"/api/v1/patients/{_patient_of(client, lesion)}", headers=AUTH).json()
    shown = next(l for l in patient["lesions"] if l["lesion_id"] == lesion)
    assert shown["outcome"]["diagnosis"] == "benign-not-biopsied"  # the latest counts
    assert client.post(f"/api/v1/lesions/{lesion}/outcome", headers=AUTH, json={"diagnosis": "NV", "diagnosed_on": "2999-01-01"}).status_code == 422
    refused = client.post(f"/api/v1/lesions/{lesion}/outcome", headers=AUTH, json={"diagnosis": "MELANOMA", "diagnosed_on": "2026-11-01"})
    assert refused.status_code == 422
    assert client.post("/api/v1/lesions/987654/outcome", headers=AUTH, json={"diagnosis": "NV", "diagnosed_on": "2026-11-01"}).status_code == 404


def _patient_of(client: TestClient, lesion_id: int) -> str:
    with client.app.state.service.sessions() as session:
        from triage.db.models import Lesion

        return session.get(Lesion, lesion_id).patient_id


def test_monitoring_equals_a_by_hand_computation_and_flags_shuffled_labels(site: dict) -> None:
    client, labels = site["client"], site["labels"]
    _enter_outcomes(client, {lesion: "MEL" if label else "NV" for lesion, label in labels.items()})
    lesions = pd.DataFrame([l for p in {_patient_of(client, i) for i in labels} for l in client.get(f"/api/v1/patients/{p}", headers=AUTH).json()["lesions"]])
    lesions["target"] = lesions["lesion_id"].map(labels)
    points = _serving(client)
    stack = client.app.state.service.bundle.stack
    for point in points:
        with client.app.state.service.sessions() as session:
            operating_point = dict(session.execute(select(Score.score_id, Score.operating_point)).all())
        rows = lesions[lesions["score_id"].map(operating_point) == point["operating_point"]]
        y, alert = rows["target"].to_numpy(int), rows["alert"].to_numpy(float)
        assert point["lesions_scored"] == len(rows) and point["melanomas"] == y.sum()
        assert point["alert_rate"]["value"] == pytest.approx(alert.mean())
        if y.sum():
            assert point["sensitivity"]["value"] == pytest.approx(sensitivity_at(y, alert, 0.5))
            assert point["ppv"]["value"] == pytest.approx(y[alert == 1].mean())
        assert point["specificity"]["value"] == pytest.approx(specificity_at(y, alert, 0.5))
        assert point["promised_sensitivity"] == stack.operating_points[point["operating_point"]].oof_sensitivity
    assert not any(SENSITIVITY_FLAG in p["flags"] for p in points), points  # the site resembles the training data
    shuffled = dict(zip(labels, np.random.default_rng(0).permutation(list(labels.values()))))
    _enter_outcomes(client, {lesion: "MEL" if label else "NV" for lesion, label in shuffled.items()})
    assert any(SENSITIVITY_FLAG in p["flags"] for p in _serving(client))  # sensitivity falls to about the alert rate
    _enter_outcomes(client, {lesion: "MEL" if label else "NV" for lesion, label in labels.items()})  # back to the truth for the tests below


def test_metrics_parse_and_their_counters_equal_the_database(site: dict) -> None:
    client = site["client"]
    assert client.get("/metrics").status_code == 401  # behind the token gate
    text = client.get("/metrics", headers=AUTH).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    with client.app.state.service.sessions() as session:
        per_point = dict(session.execute(select(Score.operating_point, func.count()).group_by(Score.operating_point)).all())
        alerts = dict(session.execute(select(Score.operating_point, func.count()).where(Score.alert.is_(True)).group_by(Score.operating_point)).all())
    scorings = {s.labels["operating_point"]: s.value for s in families["triage_scorings"].samples if s.name.endswith("_total")}
    assert scorings == {k: float(v) for k, v in per_point.items()}
    assert {s.labels["operating_point"]: s.value for s in families["triage_alerts"].samples if s.name.endswith("_total")} == {k: float(alerts.get(k, 0)) for k in per_point}
    assert "triage_request_seconds" in families and "triage_scoring_seconds" in families and "triage_promised_sensitivity" in families


def test_recalibrated_thresholds_equal_a_by_hand_computation_and_the_service_runs_on_the_new_bundle(site: dict, bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "recalibrated"
    result = RUNNER.invoke(cli_app, ["recalibrate", "--bundle", str(bundle_dir), "--database", site["settings"].database, "--out", str(out), "--min-melanomas", "10", "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recalibration"]["lesions"] == len(site["labels"]) and manifest["derived_from"]["bundle_sha256"]
    from ensemble.bundle import load_bundle
    from triage.site import bundle_outcomes

    site_rows = bundle_outcomes(site["settings"].database, bundle_dir)
    recalibrated = load_bundle(out).stack
    for name in manifest["recalibration"]["recalibrated"]:
        rows = site_rows[site_rows["operating_point"] == name]
        by_hand = PlattCalibration.fit(rows["melanoma_probability"].to_numpy(), rows["target"].to_numpy())
        threshold = threshold_for_sensitivity(rows["target"].to_numpy(int), by_hand.apply(rows["melanoma_probability"].to_numpy()), 0.95)
        assert recalibrated.operating_points[name].threshold == pytest.approx(threshold)
        assert recalibrated.operating_points[name].measured_on.startswith("site:")
    settings = site["settings"].model_copy(update={"bundle": out})
    client = TestClient(create_app(settings))
    lesion = next(iter(site["labels"]))
    patient = _patient_of(client, lesion)
    again = client.post(f"/api/v1/patients/{patient}/lesions", headers=AUTH, files=[("files", ("again.jpg", _image_of(site, lesion), "image/jpeg"))])
    assert again.status_code == 200
    assert {l["bundle_sha256"] for l in again.json()["lesions"]} == {client.app.state.service.bundle_sha256} != {site["client"].app.state.service.bundle_sha256}


def _image_of(site: dict, lesion_id: int) -> bytes:
    return site["client"].get(f"/api/v1/lesions/{lesion_id}/image", headers=AUTH).content


def test_recalibrate_refuses_too_few_melanomas(bundle_dir: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    csv = tmp_path / "predictions.csv"
    target = np.r_[np.ones(5), np.zeros(200)].astype(int)
    pd.DataFrame({"image_id": range(205), "patient_id": range(205), "operating_point": "complete",
                  "melanoma_probability": rng.random(205), "target": target}).to_csv(csv, index=False)
    result = RUNNER.invoke(cli_app, ["recalibrate", "--bundle", str(bundle_dir), "--outcomes", str(csv), "--out", str(tmp_path / "b2")])
    assert result.exit_code == 2 and "15 more melanoma(s)" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "b2").exists()


def test_harvest_is_read_back_by_inspect_and_folds_with_nothing_lost(site: dict, tmp_path: Path) -> None:
    from metadata.dataset import load_dataset

    data = tmp_path / "harvested"
    result = RUNNER.invoke(cli_app, ["harvest", "--database", site["settings"].database, "--store", str(site["settings"].image_store), "--out", str(data)])
    assert result.exit_code == 0, result.output
    table = load_dataset(data).table.set_index("image_id")
    assert len(table) == len(site["labels"])
    assert {int(i.removeprefix("TRIAGE_")): int(t) for i, t in table["target"].items()} == site["labels"]
    with database_engine(site["settings"].database).connect() as connection:
        lesions = pd.read_sql("SELECT lesion_id, patient_id, age, sex, site FROM lesions", connection).set_index("lesion_id")
    lesions.index = [f"TRIAGE_{i:08d}" for i in lesions.index]
    assert (table["patient_id"].astype(str) == lesions.loc[table.index, "patient_id"]).all()
    assert np.allclose(table["age"].astype(float), lesions.loc[table.index, "age"].astype(float), equal_nan=True)
    inspected = RUNNER.invoke(cli_app, ["inspect", "--data", str(data)])
    assert inspected.exit_code == 0, inspected.output
    folded = RUNNER.invoke(cli_app, ["folds", "--data", str(data), "--run", str(tmp_path / "run"), "--k", "3"])
    assert folded.exit_code == 0, folded.output
    assert len(pd.read_parquet(tmp_path / "run" / "folds.parquet")) == len(site["labels"])
