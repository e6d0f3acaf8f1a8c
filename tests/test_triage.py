"""The triage service: uploads and scoring from kept per-lesion inputs, worklist, reviews, restart, access,
sessions, CSRF, throttling, protective headers, error answers, the record of reads, bad uploads and
concurrent uploads (against SQLite and a real PostgreSQL), and a real browser driving the pages."""

from __future__ import annotations

import io
import re
import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from triage.db.engine import database_engine
from triage.db.models import Base, PageSession, ReadRecord, Score
from triage.http.app import create_app
from triage.security import SESSION_COOKIE
from triage.settings import Settings

SECRET = "s3cret-" + "x" * 24
TOKENS = f"dr-test={SECRET}"
AUTH = {"Authorization": f"Bearer {SECRET}"}
# what no error answer may show: a server path, a Python object's address or repr, a traceback
LEAKS = re.compile(r"/tmp/|/work/|/home/|/usr/|site-packages|0x[0-9a-f]{6,}|Traceback|<[a-z_.]+ object")


class CheckedClient(TestClient):
    """A test client that checks every answer: the protective headers on each, and no server detail in
    any error answer (so every error the tests provoke is checked)."""

    def request(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        answer = super().request(*args, **kwargs)
        assert answer.headers.get("cache-control") == "no-store" and answer.headers.get("x-content-type-options") == "nosniff", answer.headers
        assert "frame-ancestors 'none'" in answer.headers.get("content-security-policy", "") and answer.headers.get("x-request-id")
        if answer.status_code >= 400:
            assert not LEAKS.search(answer.text), answer.text[:2000]
        return answer


def settings_for(bundle_dir: Path, database: str, store: Path, **changes: object) -> Settings:
    return Settings(bundle=bundle_dir, database=database, store=store, tokens=TOKENS, max_image_pixels=200 * 200, **changes)


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triage.db'}"
    url = request.getfixturevalue("postgres_url")
    engine = database_engine(url)
    Base.metadata.drop_all(engine)  # each test starts from an empty database
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    return url


@pytest.fixture
def client(bundle_dir: Path, database: str, tmp_path: Path) -> CheckedClient:
    return CheckedClient(create_app(settings_for(bundle_dir, database, tmp_path / "store")), base_url="http://triage.test")


@pytest.fixture(scope="module")
def images(cohort_dir: Path) -> list[tuple[str, bytes]]:
    """Training images of the cohort, melanomas first (the bundle alerts on some of them)."""
    train = pd.read_csv(cohort_dir / "train.csv").sort_values("target", ascending=False, kind="stable")
    return [(f"{name}.jpg", (cohort_dir / "jpeg" / "train" / f"{name}.jpg").read_bytes()) for name in train["image_name"][:12]]


def _upload(client: TestClient, patient: str, files: list[tuple[str, bytes]], **form: str):  # noqa: ANN202
    return client.post(
        f"/api/v1/patients/{patient}/lesions", headers=AUTH, data=form,
        files=[("files", (name, content, "image/jpeg")) for name, content in files],
    )


def _sign_in(client: TestClient, token: str = SECRET) -> str:
    """Sign the client's browser in; the CSRF token of its session."""
    answer = client.post("/login", data={"token": token}, headers={"origin": "http://triage.test"}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)


def test_upload_scores_the_whole_patient_and_ranks_stay_consistent(client: CheckedClient, images: list) -> None:
    first = _upload(client, "P1", images[:1], age="60", sex="male", site="torso")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["patient_id"] == "P1" and len(body["lesions"]) == 1
    lesion = body["lesions"][0]
    assert lesion["rank_in_patient"] == 1 and lesion["missing_metadata"] == [] and 0 <= lesion["melanoma_probability"] <= 1
    lesions = _upload(client, "P1", images[1:4]).json()["lesions"]
    assert len(lesions) == 4
    by_risk = sorted(lesions, key=lambda l: -l["melanoma_probability"])
    assert [l["rank_in_patient"] for l in by_risk] == [1, 2, 3, 4]
    assert [l["lesion_id"] for l in lesions] == [l["lesion_id"] for l in by_risk]  # listed riskiest first
    assert {l["lesion_id"]: l["missing_metadata"] for l in lesions}[lesion["lesion_id"]] == []  # its own metadata kept
    assert all(l["missing_metadata"] == ["age", "sex", "site"] for l in lesions if l["lesion_id"] != lesion["lesion_id"])
    assert client.get("/api/v1/patients/P1", headers=AUTH).json()["lesions"] == lesions


def test_each_image_runs_through_the_models_once_and_scores_equal_a_fresh_scoring(bundle_dir: Path, tmp_path: Path, images: list) -> None:
    """Adding lesions computes only the new images; the patient's scores equal `predict` on all its images at once."""
    from ensemble.predict import score_patients
    from metadata.schema import canonical_table

    app = create_app(settings_for(bundle_dir, f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "store"))
    client, service = CheckedClient(app), app.state.service
    for chunk in (images[:3], images[3:4], images[4:6]):
        assert _upload(client, "ONCE", chunk, age="55", sex="female").status_code == 200
    assert service.images_scored == 6
    assert _upload(client, "TWIN", images[:2]).status_code == 200  # the same contents for another patient: nothing to compute
    assert service.images_scored == 6
    served = pd.DataFrame(client.get("/api/v1/patients/ONCE", headers=AUTH).json()["lesions"]).sort_values("lesion_id")
    paths = [str(tmp_path / "store" / sha[:2] / f"{sha}.jpg") for sha in served["image_sha256"]]
    rows = canonical_table({"image_id": pd.Series([f"l{i}" for i in range(6)], dtype="string"), "patient_id": pd.Series(["ONCE"] * 6, dtype="string"),
                            "image_path": pd.Series(paths, dtype="string"), "age": pd.Series([55.0] * 6), "sex": pd.Series(["female"] * 6, dtype="string"),
                            "split": pd.Series(["test"] * 6, dtype="string")})
    fresh = score_patients(service.bundle, rows, batch_size=32, advance=lambda n: None).predictions.set_index("image_id").loc[[f"l{i}" for i in range(6)]]
    np.testing.assert_allclose(served["melanoma_probability"].to_numpy(), fresh["melanoma_probability"].to_numpy(), rtol=0, atol=1e-6)
    assert served["rank_in_patient"].tolist() == fresh["rank_in_patient"].tolist()
    assert served["alert"].tolist() == fresh["alert"].astype(bool).tolist()


def test_worklist_orders_alerts_by_risk_and_reviews_close_them(client: CheckedClient, images: list) -> None:
    for patient, chunk in (("A", images[:4]), ("B", images[4:8])):
        assert _upload(client, patient, chunk, age="70").status_code == 200
    open_list = client.get("/api/v1/worklist?status=open", headers=AUTH).json()["lesions"]
    assert open_list, "the test bundle alerts on some melanomas"
    assert all(l["alert"] for l in open_list)
    probabilities = [l["melanoma_probability"] for l in open_list]
    assert probabilities == sorted(probabilities, reverse=True)
    top = open_list[0]["lesion_id"]
    review = client.post(f"/api/v1/lesions/{top}/review", headers=AUTH, json={"outcome": "biopsy", "note": "within 2 weeks"})
    assert review.status_code == 200 and review.json()["reviewed_by"] == "dr-test"
    assert top not in [l["lesion_id"] for l in client.get("/api/v1/worklist", headers=AUTH).json()["lesions"]]
    reviewed = client.get("/api/v1/worklist?status=reviewed", headers=AUTH).json()["lesions"]
    assert [l["lesion_id"] for l in reviewed] == [top] and reviewed[0]["reviews"][0]["outcome"] == "biopsy"
    assert client.post(f"/api/v1/lesions/{top}/review", headers=AUTH, json={"outcome": "maybe"}).status_code == 422
    assert client.post("/api/v1/lesions/999999/review", headers=AUTH, json={"outcome": "benign"}).status_code == 404


def test_restart_loses_nothing_and_every_scoring_is_on_record(bundle_dir: Path, database: str, tmp_path: Path, images: list) -> None:
    settings = settings_for(bundle_dir, database, tmp_path / "store")
    first = CheckedClient(create_app(settings))
    _upload(first, "P9", images[:2])
    before = first.get("/api/v1/patients/P9", headers=AUTH).json()
    restarted = CheckedClient(create_app(settings))
    assert restarted.get("/api/v1/patients/P9", headers=AUTH).json() == before
    _upload(restarted, "P9", images[2:3])
    with database_engine(database).connect() as connection:
        scores = pd.read_sql_table(Score.__tablename__, connection)
    assert len(scores) == 2 + 3  # the first upload's two scorings are kept beside the re-scoring
    assert scores["scored_by"].eq("dr-test").all() and scores["bundle_sha256"].nunique() == 1
    image = restarted.get(f"/api/v1/lesions/{before['lesions'][0]['lesion_id']}/image", headers=AUTH)
    assert image.content == dict(images)[before["lesions"][0]["file_name"]]


def test_the_api_takes_bearer_tokens_only_and_pages_take_sessions(client: CheckedClient, images: list) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"
    assert _upload(client, "P2", images[:1]).status_code == 200
    for path in ("/api/v1/patients/P2", "/api/v1/worklist", "/api/v1/lesions/1/gradcam.png", "/openapi.json", "/docs", "/worklist"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/v1/worklist", headers={"Authorization": "Bearer café".encode()}).status_code == 401  # not a crash
    assert "Sign in" in client.get("/worklist").text
    _sign_in(client)
    assert client.get("/worklist").status_code == 200 and client.get("/patients/P2").status_code == 200
    assert client.get("/api/v1/worklist").status_code == 401  # the session cookie does not open the API
    cookie = client.cookies[SESSION_COOKIE]
    assert SECRET not in cookie and client.get("/api/v1/worklist", headers={"Authorization": f"Bearer {cookie}"}).status_code == 401
    assert client.get("/openapi.json", headers=AUTH).status_code == 200


def test_sign_out_ends_the_session_and_sessions_expire(bundle_dir: Path, tmp_path: Path) -> None:
    app = create_app(settings_for(bundle_dir, f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "store"))
    client = CheckedClient(app, base_url="http://triage.test")
    csrf = _sign_in(client)
    cookie = client.cookies[SESSION_COOKIE]
    assert client.post("/logout", data={"csrf_token": csrf}, headers={"origin": "http://triage.test"}, follow_redirects=False).status_code == 303
    client.cookies.set(SESSION_COOKIE, cookie)  # a copy of the cookie kept elsewhere
    assert client.get("/worklist").status_code == 401
    client.cookies.clear()
    _sign_in(client)
    with app.state.service.sessions.begin() as session:
        for row in session.query(PageSession):
            row.expires_at = row.created_at - timedelta(seconds=1)
    assert client.get("/worklist").status_code == 401
    idle = CheckedClient(create_app(settings_for(bundle_dir, f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "store", idle_minutes=1)), base_url="http://triage.test")
    _sign_in(idle)
    with idle.app.state.service.sessions.begin() as session:
        for row in session.query(PageSession).filter(PageSession.ended_at.is_(None)):
            row.last_seen_at = row.last_seen_at - timedelta(minutes=2)
    assert idle.get("/worklist").status_code == 401


def test_forms_from_another_origin_or_without_their_token_are_refused(client: CheckedClient, images: list) -> None:
    csrf = _sign_in(client)
    assert _upload(client, "P11", images[:1]).status_code == 200
    lesion = client.get("/api/v1/patients/P11", headers=AUTH).json()["lesions"][0]["lesion_id"]
    review = f"/lesions/{lesion}/review"
    for origin in ("http://evil.test", "http://triage.test:8081"):  # another site, and the same host at another port
        assert client.post(review, data={"outcome": "benign", "csrf_token": csrf}, headers={"origin": origin}).status_code == 403
    assert client.post(review, data={"outcome": "benign"}, headers={"origin": "http://triage.test"}).status_code == 403  # no token
    assert client.post(review, data={"outcome": "benign", "csrf_token": "forged"}, headers={"origin": "http://triage.test"}).status_code == 403
    assert client.post(review, data={"outcome": "benign", "csrf_token": csrf}).status_code == 403  # neither Origin nor Referer
    upload = client.post("/upload", data={"patient_id": "P11", "csrf_token": csrf}, files=[("files", images[1])], headers={"origin": "http://evil.test"})
    assert upload.status_code == 403 and len(client.get("/api/v1/patients/P11", headers=AUTH).json()["lesions"]) == 1
    accepted = client.post(review, data={"outcome": "benign", "csrf_token": csrf}, headers={"origin": "http://triage.test"}, follow_redirects=False)
    assert accepted.status_code == 303
    assert client.post(review, data={"outcome": "benign", "csrf_token": csrf}, headers={"referer": "http://triage.test/worklist"}, follow_redirects=False).status_code == 303
    assert client.post("/login", data={"token": SECRET}, headers={"origin": "http://evil.test"}).status_code == 403  # no sign-in forced from elsewhere


def test_failed_sign_ins_are_throttled(client: CheckedClient) -> None:
    for _ in range(5):
        assert client.post("/login", data={"token": "wrong"}, headers={"origin": "http://triage.test"}).status_code == 401
    throttled = client.post("/login", data={"token": SECRET}, headers={"origin": "http://triage.test"})
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) > 0


def test_a_weak_or_malformed_token_is_refused_at_start(bundle_dir: Path, tmp_path: Path) -> None:
    from errors import UserError
    from triage.settings import parse_tokens

    with pytest.raises(UserError, match="at least 24"):
        Settings(bundle=bundle_dir, tokens="dr=short")
    assert parse_tokens("dr-lee=abc==,xyz") == {"abc==": "dr-lee", "xyz": "default"}
    with pytest.raises(UserError, match="empty"):
        parse_tokens("dr-lee=")
    with pytest.raises(UserError, match="at most 64"):  # the audit columns hold 64 characters
        parse_tokens("a" * 65 + "=secret")


def test_every_read_of_patient_data_is_recorded(client: CheckedClient, database: str, images: list) -> None:
    lesion = _upload(client, "P12", images[:1]).json()["lesions"][0]["lesion_id"]
    _sign_in(client)
    reads = {
        "/api/v1/patients/{patient_id}": "/api/v1/patients/P12", "/api/v1/worklist": "/api/v1/worklist?status=open",
        "/api/v1/lesions/{lesion_id}/image": f"/api/v1/lesions/{lesion}/image", "/api/v1/lesions/{lesion_id}/gradcam.png": f"/api/v1/lesions/{lesion}/gradcam.png",
        "/patients/{patient_id}": "/patients/P12", "/worklist": "/worklist?status=open", "/lesions/{lesion_id}/image": f"/lesions/{lesion}/image",
    }
    answers = {route: client.get(path, headers=AUTH if path.startswith("/api") else {}) for route, path in reads.items()}
    with database_engine(database).connect() as connection:
        records = pd.read_sql_table(ReadRecord.__tablename__, connection)
    for route, answer in answers.items():
        assert answer.status_code == 200, (route, answer.text)
        mine = records[(records["route"] == route) & (records["request_id"] == answer.headers["x-request-id"])]
        assert len(mine) >= 1 and (mine["actor"] == "dr-test").all(), route
    if "open" in client.get("/api/v1/worklist", headers=AUTH).text:
        assert set(records.loc[records["route"] == "/api/v1/patients/{patient_id}", "patient_id"]) == {"P12"}


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_uploads_are_refused_and_store_nothing(client: CheckedClient, images: list, tmp_path: Path) -> None:
    assert _upload(client, "P3", images[:1]).status_code == 200
    stored = sorted(p for p in (tmp_path / "store").rglob("*") if p.is_file())
    unknown_sex = _upload(client, "P3", images[1:2], sex="robot")
    assert unknown_sex.status_code == 422 and unknown_sex.json()["allowed"] == ["female", "male"]
    assert _upload(client, "P3", images[1:2], site="elbow").status_code == 422
    assert _upload(client, "P3", images[1:2], age="300").status_code == 422
    assert _upload(client, "P3", images[1:2], age="nan").status_code == 422
    not_an_image = _upload(client, "P3", [images[1], ("photo.jpg", b"<html>not an image</html>")])
    assert not_an_image.status_code == 422 and "photo.jpg" in not_an_image.json()["detail"]
    bomb = _upload(client, "P3", [("bomb.png", _png(400, 400))])  # 160,000 pixels, over this service's 40,000
    assert bomb.status_code == 413 and "pixels" in bomb.json()["detail"]
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert _upload(client, "P3", [("x.png", gif.getvalue())]).status_code == 422  # content decides, not the name
    assert len(client.get("/api/v1/patients/P3", headers=AUTH).json()["lesions"]) == 1
    assert sorted(p for p in (tmp_path / "store").rglob("*") if p.is_file()) == stored


def test_a_request_over_the_size_limit_is_refused(bundle_dir: Path, tmp_path: Path, images: list) -> None:
    settings = settings_for(bundle_dir, f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "store", max_image_bytes=1024, max_request_bytes=10**6)
    small = CheckedClient(create_app(settings))
    assert _upload(small, "P4", [("big.png", _png(64, 64) + b"\0" * 2000)]).status_code == 413
    assert _upload(small, "P4", [("huge.jpg", b"\xff" * (2 * 10**6))]).status_code == 413
    part = b'--x\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    chunked = small.post("/api/v1/patients/P4/lesions", headers={**AUTH, "content-type": "multipart/form-data; boundary=x"},
                         content=(part if i == 0 else b"\xff" * 100_000 for i in range(21)))  # no Content-Length: counted as it arrives
    assert chunked.status_code == 413
    assert _upload(small, "bad id", [("a.png", _png(8, 8))]).status_code == 422
    anonymous = small.post("/api/v1/patients/P7/lesions", files=[("files", ("big.jpg", b"\xff" * 10**5, "image/jpeg"))])
    assert anonymous.status_code == 401  # the gate answers before the body counts
    assert small.post("/login", data={"token": "x" * 100_000}).status_code == 413  # the open sign-in form takes small bodies only


def test_odd_ids_notes_and_images_get_answers_not_server_errors(client: CheckedClient, database: str, images: list) -> None:
    lesion = _upload(client, "P8", images[:1]).json()["lesions"][0]
    for path in ("/api/v1/lesions/99999999999999999999/image", "/api/v1/lesions/0/gradcam.png", "/api/v1/patients/P%00X"):
        assert client.get(path, headers=AUTH).status_code == 422
    assert client.get("/api/v1/lesions/424242/image", headers=AUTH).status_code == 404
    assert client.get("/api/v1/patients/NOBODY", headers=AUTH).status_code == 404
    review = f"/api/v1/lesions/{lesion['lesion_id']}/review"
    assert client.post(review, headers=AUTH, json={"outcome": "benign", "note": "a\x00b"}).status_code == 422
    assert client.post(review, headers=AUTH, json={"outcome": "benign", "note": "x" * 4001}).status_code == 422
    assert client.post(review, headers=AUTH, json={"outcome": "benign", "extra": 1}).status_code == 422
    assert client.post(review, headers={**AUTH, "content-type": "application/json"}, content=b"{not json").status_code == 422
    kept = client.post(review, headers=AUTH, json={"outcome": "benign", "note": "seen"}).json()
    seen = client.get("/api/v1/patients/P8", headers=AUTH).json()["lesions"][0]["score_id"]
    assert kept["score_id"] == seen  # the review names the score (and so the bundle) it answered
    _upload(client, "P8", images[2:3])  # re-scores the patient while the reviewer reads the older score
    answered = client.post(review, headers=AUTH, json={"outcome": "biopsy", "score_id": seen}).json()
    assert answered["score_id"] == seen
    assert client.post(review, headers=AUTH, json={"outcome": "biopsy", "score_id": 10**6}).status_code == 404  # not a score of this lesion
    camera = io.BytesIO()  # a camera JPEG with a multi-picture marker: Pillow calls it MPO
    first = Image.open(io.BytesIO(images[1][1])).convert("RGB")
    first.save(camera, format="MPO", save_all=True, append_images=[first])
    assert _upload(client, "P8", [("camera.jpg", camera.getvalue())]).status_code == 200


def test_a_missing_stored_image_is_the_servers_fault_and_hides_its_path(client: CheckedClient, images: list, tmp_path: Path) -> None:
    lesion = _upload(client, "P10", images[:1]).json()["lesions"][0]["lesion_id"]
    for stored in (tmp_path / "store").rglob("*.jpg"):
        stored.unlink()  # the share went away
    answer = client.get(f"/api/v1/lesions/{lesion}/image", headers=AUTH)
    assert answer.status_code == 503 and answer.json()["request_id"] == answer.headers["x-request-id"]


def test_a_failure_while_scoring_stores_no_row_and_answers_with_the_request_id(bundle_dir: Path, database: str, tmp_path: Path, images: list, monkeypatch: pytest.MonkeyPatch) -> None:
    import triage.service

    app = create_app(settings_for(bundle_dir, database, tmp_path / "store"))
    client = CheckedClient(app)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"the models are gone from {tmp_path}")

    monkeypatch.setattr(triage.service, "judge_lesions", broken)
    failed = _upload(client, "FAIL", images[:2])
    assert failed.status_code == 500 and failed.json()["request_id"] == failed.headers["x-request-id"]
    assert client.get("/api/v1/patients/FAIL", headers=AUTH).status_code == 404  # not even the patient
    with database_engine(database).connect() as connection:
        assert pd.read_sql_table("lesions", connection).empty and pd.read_sql_table("scores", connection).empty
    assert app.state.service.sweep_orphans(older_than_seconds=0) == 2  # the images nothing refers to
    assert not [p for p in (tmp_path / "store").rglob("*.jpg")]


def test_concurrent_uploads_for_one_patient_lose_no_lesion(client: CheckedClient, images: list) -> None:
    answers: list[int] = []

    def upload(chunk: list) -> None:
        answers.append(_upload(client, "P5", chunk).status_code)

    threads = [threading.Thread(target=upload, args=(images[i : i + 2],)) for i in range(0, 8, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * 4
    lesions = client.get("/api/v1/patients/P5", headers=AUTH).json()["lesions"]
    assert len(lesions) == 8
    assert sorted(l["rank_in_patient"] for l in lesions) == list(range(1, 9))  # the current scores come from one scoring
    assert len({l["scored_at"] for l in lesions}) == 1


def test_two_instances_uploading_for_one_new_patient_lose_no_lesion_and_refuse_none(bundle_dir: Path, database: str, tmp_path: Path, images: list) -> None:
    settings = settings_for(bundle_dir, database, tmp_path / "shared-store")
    instances = [CheckedClient(create_app(settings)) for _ in range(2)]
    answers: list[int] = []
    threads = [
        threading.Thread(target=lambda c=c, chunk=images[i * 3 : i * 3 + 3]: answers.append(_upload(c, "NEW", chunk).status_code))
        for i, c in enumerate(instances * 2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [200] * 4
    lesions = instances[0].get("/api/v1/patients/NEW", headers=AUTH).json()["lesions"]
    assert len(lesions) == 12
    assert sorted(l["rank_in_patient"] for l in lesions) == list(range(1, 13)) and len({l["scored_at"] for l in lesions}) == 1
    assert instances[1].get("/api/v1/patients/NEW", headers=AUTH).json() == instances[0].get("/api/v1/patients/NEW", headers=AUTH).json()


def test_a_whole_exam_in_one_request(client: CheckedClient, images: list) -> None:
    answer = _upload(client, "EXAM", images, age="48", site="back")
    assert answer.status_code == 200 and len(answer.json()["lesions"]) == len(images)
    assert sorted(l["rank_in_patient"] for l in answer.json()["lesions"]) == list(range(1, len(images) + 1))


def test_gradcam_and_offline_docs(client: CheckedClient, images: list) -> None:
    lesion = _upload(client, "P6", images[:1]).json()["lesions"][0]["lesion_id"]
    first = client.get(f"/api/v1/lesions/{lesion}/gradcam.png", headers=AUTH)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(first.content)).size == Image.open(io.BytesIO(images[0][1])).size
    assert client.get(f"/api/v1/lesions/{lesion}/gradcam.png", headers=AUTH).content == first.content  # kept
    _sign_in(client)
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/api/v1/patients/{patient_id}/lesions" in docs.text
    schema = client.get("/openapi.json", headers=AUTH).json()
    assert "/api/v1/worklist" in schema["paths"] and not any(path.startswith("/login") for path in schema["paths"])
    patient = schema["paths"]["/api/v1/patients/{patient_id}"]["get"]["responses"]
    assert patient["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PatientOut")  # a schema, not `object`
    assert patient["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut")


def test_a_browser_signs_in_uploads_finds_the_alert_and_a_page_elsewhere_cannot_post(browser, bundle_dir: Path, tmp_path: Path, images: list) -> None:  # noqa: ANN001
    import socket
    import time

    import uvicorn

    app = create_app(settings_for(bundle_dir, f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "store"))
    servers = []
    for target in (app, _attacker_page):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(target, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        servers.append((server, port))
    (_, port), (_, attacker) = servers
    files = []
    for name, content in images[:2]:
        files.append(tmp_path / name)
        files[-1].write_bytes(content)
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/login")
        page.fill("#token", SECRET)
        page.click("button[type=submit]")
        page.wait_for_url(f"http://127.0.0.1:{port}/")
        page.fill("#patient_id", "WEB1")
        page.set_input_files("#files", [str(f) for f in files])
        page.fill("#age", "64")
        page.select_option("#sex", "female")
        page.select_option("#site", "torso")
        page.click("button:has-text('Upload and score')")
        page.wait_for_url("**/patients/WEB1")
        assert page.locator("tr[data-lesion]").count() == 2
        alerted = page.locator(".badge.alert").count()
        assert alerted >= 1, page.content()
        page.locator("details summary").first.click()  # the Grad-CAM toggle
        page.wait_for_function("() => { const i = document.querySelector('details[open] img'); return i && i.complete && i.naturalWidth > 0; }")
        page.goto(f"http://127.0.0.1:{port}/worklist")
        assert page.locator("tr[data-lesion]").count() == alerted
        lesion = page.locator("tr[data-lesion]").first.get_attribute("data-lesion")
        # a page on the same host at another port (same site: SameSite does not stop it) auto-posts a review
        page.goto(f"http://127.0.0.1:{attacker}/?target=http://127.0.0.1:{port}/lesions/{lesion}/review")
        page.wait_for_load_state("networkidle")
        assert "form must be sent from this service" in page.content() or "security token" in page.content()
        page.goto(f"http://127.0.0.1:{port}/worklist")
        assert page.locator("tr[data-lesion]").count() == alerted  # nothing was stored
        page.click("button:has-text('Save review')")
        page.wait_for_url("**/worklist")
        assert page.locator("tr[data-lesion]").count() == alerted - 1
        page.click("button:has-text('Sign out')")
        page.wait_for_url("**/login")
        page.goto(f"http://127.0.0.1:{port}/worklist")
        assert "Sign in" in page.content()
    finally:
        page.close()
        for server, _ in servers:
            server.should_exit = True


async def _attacker_page(scope, receive, send) -> None:  # noqa: ANN001
    """A page that posts a review to the URL in its query string as soon as it loads (no token: it cannot read one)."""
    target = scope["query_string"].decode().removeprefix("target=")
    body = (f'<html><body><form id="f" method="post" action="{target}"><input name="outcome" value="benign"></form>'
            '<script>document.getElementById("f").submit()</script></body></html>').encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
    await send({"type": "http.response.body", "body": body})


def test_serve_refuses_an_open_service_on_the_network_and_a_shared_database_without_a_shared_image_folder(bundle_dir: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    runner = CliRunner(env={"COLUMNS": "300"})
    result = runner.invoke(app, ["serve", "--bundle", str(bundle_dir), "--database", "postgresql+psycopg://u@db/triage"])
    assert result.exit_code == 2 and "--store" in result.output
    result = runner.invoke(app, ["serve", "--bundle", str(bundle_dir), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "needs --token" in result.output
