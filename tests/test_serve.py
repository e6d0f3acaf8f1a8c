"""The triage service: upload and re-score, worklist, review, restart, access, bad uploads, concurrent
uploads (against SQLite and a real PostgreSQL), and a real browser driving the pages."""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ensemble.serve.app import create_app
from ensemble.serve.store import Base, Score, database_engine
from ensemble.serve.triage import TriageService, UploadLimits
from errors import UserError

TOKEN = {"s3cret": "dr-test"}
AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triage.db'}"
    url = request.getfixturevalue("postgres_url")
    Base.metadata.drop_all(database_engine(url))  # each test starts from empty tables
    return url


def _service(bundle_dir: Path, database: str, store: Path, **limits: int) -> TriageService:
    return TriageService(bundle_dir, database, store, limits=UploadLimits(**limits) if limits else UploadLimits())


@pytest.fixture
def client(bundle_dir: Path, database: str, tmp_path: Path) -> TestClient:
    return TestClient(create_app(_service(bundle_dir, database, tmp_path / "store", max_pixels=200 * 200), TOKEN))


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


def test_upload_rescores_the_whole_patient_and_ranks_stay_consistent(client: TestClient, images: list) -> None:
    first = _upload(client, "P1", images[:1], age="60", sex="male", site="torso")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["patient_id"] == "P1" and len(body["lesions"]) == 1
    lesion = body["lesions"][0]
    assert set(lesion) >= {"lesion_id", "image_sha256", "melanoma_probability", "alert", "rank_in_patient", "diagnosis", "missing_metadata"}
    assert lesion["rank_in_patient"] == 1 and lesion["missing_metadata"] == [] and 0 <= lesion["melanoma_probability"] <= 1
    second = _upload(client, "P1", images[1:4]).json()
    lesions = second["lesions"]
    assert len(lesions) == 4
    by_risk = sorted(lesions, key=lambda l: -l["melanoma_probability"])
    assert [l["rank_in_patient"] for l in by_risk] == [1, 2, 3, 4]
    assert [l["lesion_id"] for l in lesions] == [l["lesion_id"] for l in by_risk]  # listed riskiest first
    assert {l["lesion_id"]: l["missing_metadata"] for l in lesions}[lesion["lesion_id"]] == []  # its own metadata kept
    assert all(l["missing_metadata"] == ["age", "sex", "site"] for l in lesions if l["lesion_id"] != lesion["lesion_id"])
    assert client.get("/api/v1/patients/P1", headers=AUTH).json()["lesions"] == lesions


def test_worklist_orders_alerts_by_risk_and_reviews_close_them(client: TestClient, images: list) -> None:
    for patient, chunk in (("A", images[:4]), ("B", images[4:8])):
        assert _upload(client, patient, chunk, age="70").status_code == 200
    open_list = client.get("/api/v1/worklist?status=open", headers=AUTH).json()["lesions"]
    assert open_list, "the demo bundle alerts on some melanomas"
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
    store = tmp_path / "store"
    first = TestClient(create_app(_service(bundle_dir, database, store), TOKEN))
    _upload(first, "P9", images[:2])
    before = first.get("/api/v1/patients/P9", headers=AUTH).json()
    restarted = TestClient(create_app(_service(bundle_dir, database, store), TOKEN))
    assert restarted.get("/api/v1/patients/P9", headers=AUTH).json() == before
    _upload(restarted, "P9", images[2:3])
    engine = database_engine(database)
    with engine.connect() as connection:
        scores = pd.read_sql_table(Score.__tablename__, connection)
    assert len(scores) == 2 + 3  # the first upload's two scorings are kept beside the re-scoring
    assert scores["scored_by"].eq("dr-test").all() and scores["bundle_sha256"].nunique() == 1
    assert restarted.get(f"/api/v1/lesions/{before['lesions'][0]['lesion_id']}/image", headers=AUTH).content == dict(images)[before["lesions"][0]["file_name"]]


def test_tokens_guard_every_call_and_page(client: TestClient, images: list) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"
    assert _upload(client, "P2", images[:1]).status_code == 200
    for path in ("/api/v1/patients/P2", "/api/v1/worklist", "/api/v1/lesions/1/gradcam.png"):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/api/v1/patients/P2/lesions", files=[("files", images[0])]).status_code == 401
    assert client.get("/api/v1/worklist", headers={"Authorization": "Bearer café".encode()}).status_code == 401  # not a crash
    for path in ("/docs", "/openapi.json"):  # the API's description too
        assert client.get(path).status_code == 401
    assert client.get("/worklist").status_code == 401 and "Sign in" in client.get("/worklist").text
    assert client.post("/login", data={"token": "wrong"}).status_code == 401 and not client.cookies
    client.post("/login", data={"token": "s3cret"})  # the page's cookie
    assert client.get("/worklist").status_code == 200
    assert client.get("/patients/P2").status_code == 200
    cookie = client.cookies["triage_token"]
    assert "s3cret" not in cookie  # a stolen cookie does not give away the API token
    assert client.get("/api/v1/worklist", headers={"Authorization": f"Bearer {cookie}"}).status_code == 401


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_uploads_are_refused_and_store_nothing(client: TestClient, images: list, tmp_path: Path) -> None:
    assert _upload(client, "P3", images[:1]).status_code == 200
    stored = sorted(p for p in (tmp_path / "store").rglob("*") if p.is_file())
    unknown_sex = _upload(client, "P3", images[1:2], sex="robot")
    assert unknown_sex.status_code == 422 and unknown_sex.json()["allowed"] == ["female", "male"]
    assert _upload(client, "P3", images[1:2], site="elbow").status_code == 422
    assert _upload(client, "P3", images[1:2], age="300").status_code == 422
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
    small = TestClient(create_app(_service(bundle_dir, f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "store", max_bytes=1000), TOKEN, max_request_bytes=10**6))
    too_big_file = _upload(small, "P4", [("big.png", _png(64, 64) + b"\0" * 2000)])
    assert too_big_file.status_code == 413
    assert _upload(small, "P4", [("huge.jpg", b"\xff" * (2 * 10**6))]).status_code == 413
    chunked = small.post("/api/v1/patients/P4/lesions", headers={**AUTH, "content-type": "multipart/form-data; boundary=x"},
                         content=(b"x" * 100_000 for _ in range(20)))  # no Content-Length: counted as it arrives
    assert chunked.status_code == 413
    assert _upload(small, "bad/id", [("a.png", _png(8, 8))]).status_code in (404, 422)
    assert _upload(small, "bad id", [("a.png", _png(8, 8))]).status_code == 422


def test_tokens_are_label_secret_pairs() -> None:
    from ensemble.serve.app import parse_tokens

    assert parse_tokens("dr-lee=abc==,xyz") == {"abc==": "dr-lee", "xyz": "default"}
    with pytest.raises(UserError, match="empty"):
        parse_tokens("dr-lee=")
    with pytest.raises(UserError, match="at most 64"):  # the audit columns hold 64 characters
        parse_tokens("a" * 65 + "=secret")
    assert parse_tokens("q1w2e3r4t5y6u7i8o9p0aa==") == {"q1w2e3r4t5y6u7i8o9p0aa==": "default"}  # base64 padding, not label=secret


def test_no_token_is_refused_before_the_body_is_read(bundle_dir: Path, tmp_path: Path, images: list) -> None:
    small = TestClient(create_app(_service(bundle_dir, f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "store"), TOKEN, max_request_bytes=10**5))
    anonymous = small.post("/api/v1/patients/P7/lesions", files=[("files", ("big.jpg", b"\xff" * 10**6, "image/jpeg"))])
    assert anonymous.status_code == 401  # not 413: the gate answers before the body counts
    assert _upload(small, "P7", [("big.jpg", b"\xff" * 10**6)]).status_code == 413
    assert small.post("/login", data={"token": "x" * 100_000}).status_code == 413  # the open sign-in form takes small bodies only


def test_odd_ids_notes_and_images_get_answers_not_server_errors(client: TestClient, database: str, images: list) -> None:
    lesion = _upload(client, "P8", images[:1]).json()["lesions"][0]
    for path in ("/api/v1/lesions/99999999999999999999/image", "/api/v1/lesions/0/gradcam.png"):
        assert client.get(path, headers=AUTH).status_code == 422
    assert client.get("/api/v1/lesions/424242/image", headers=AUTH).status_code == 404
    assert client.get("/api/v1/patients/P%00X", headers=AUTH).status_code == 404
    page = client.post("/lesions/424242/review", headers=AUTH, data={"outcome": "benign"})
    assert page.status_code == 404 and "<html" in page.text.lower()  # a page, not JSON
    review = f"/api/v1/lesions/{lesion['lesion_id']}/review"
    assert client.post(review, headers=AUTH, json={"outcome": "benign", "note": "a\x00b"}).status_code == 422
    assert client.post(review, headers=AUTH, json={"outcome": "benign", "note": "x" * 4001}).status_code == 422
    kept = client.post(review, headers=AUTH, json={"outcome": "benign", "note": "seen"}).json()
    with database_engine(database).connect() as connection:
        scores = pd.read_sql_table(Score.__tablename__, connection)
    assert kept["score_id"] == scores["score_id"].max()  # the review names the score (and so the bundle) it answered
    seen = client.get("/api/v1/patients/P8", headers=AUTH).json()["lesions"][0]["score_id"]
    _upload(client, "P8", images[2:3])  # re-scores the patient while the reviewer reads the older score
    answered = client.post(review, headers=AUTH, json={"outcome": "biopsy", "score_id": seen}).json()
    assert answered["score_id"] == seen
    assert client.post(review, headers=AUTH, json={"outcome": "biopsy", "score_id": 10**6}).status_code == 404  # not a score of this lesion
    camera = io.BytesIO()  # a camera JPEG with a multi-picture marker: Pillow calls it MPO
    first = Image.open(io.BytesIO(images[1][1])).convert("RGB")
    first.save(camera, format="MPO", save_all=True, append_images=[first])
    assert Image.open(io.BytesIO(camera.getvalue())).format == "MPO"
    assert _upload(client, "P8", [("camera.jpg", camera.getvalue())]).status_code == 200


def test_a_missing_stored_image_is_the_servers_fault_and_hides_its_path(client: TestClient, images: list, tmp_path: Path) -> None:
    lesion = _upload(client, "P10", images[:1]).json()["lesions"][0]["lesion_id"]
    for stored in (tmp_path / "store").rglob("*.jpg"):
        stored.unlink()  # the share went away
    answer = client.get(f"/api/v1/lesions/{lesion}/image", headers=AUTH)
    assert answer.status_code == 503 and str(tmp_path) not in answer.text


def test_a_database_from_before_review_scores_gets_the_column(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, inspect, text

    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = create_engine(url)
    with old.begin() as connection:  # the reviews table as the first version made it
        connection.execute(text("CREATE TABLE reviews (review_id INTEGER PRIMARY KEY, lesion_id INTEGER, outcome VARCHAR(16), "
                                "note TEXT, reviewed_at DATETIME, reviewed_by VARCHAR(64))"))
    engine = database_engine(url)
    assert "score_id" in {c["name"] for c in inspect(engine).get_columns("reviews")}


def test_a_reused_image_file_is_not_swept_as_an_orphan(tmp_path: Path) -> None:
    import os

    from ensemble.serve.store import ImageStore

    store = ImageStore(tmp_path)
    sha, created = store.put(b"jpeg bytes", ".jpg")
    os.utime(store.path(sha, ".jpg"), (0, 0))  # left by an upload long ago
    assert store.put(b"jpeg bytes", ".jpg") == (sha, False)
    assert store.path(sha, ".jpg").stat().st_mtime > 10**9  # fresh again: a starting instance's sweep passes it over


def test_concurrent_uploads_for_one_patient_lose_no_lesion(client: TestClient, images: list) -> None:
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
    assert sorted(l["rank_in_patient"] for l in lesions) == list(range(1, 9))  # the latest scores come from one scoring
    assert len({l["scored_at"] for l in lesions}) == 1


def test_two_instances_uploading_for_one_new_patient_lose_no_lesion(bundle_dir: Path, database: str, tmp_path: Path, images: list) -> None:
    store = tmp_path / "shared-store"
    instances = [TestClient(create_app(_service(bundle_dir, database, store), TOKEN)) for _ in range(2)]
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


def test_an_upload_that_fails_while_scoring_stores_no_row(bundle_dir: Path, database: str, tmp_path: Path, images: list, monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service(bundle_dir, database, tmp_path / "store")
    client = TestClient(create_app(service, TOKEN), raise_server_exceptions=False)

    def broken(lesions: list) -> None:
        raise RuntimeError("the models are gone")

    monkeypatch.setattr(service, "_score", broken)
    assert _upload(client, "FAIL", images[:2]).status_code == 500
    assert client.get("/api/v1/patients/FAIL", headers=AUTH).status_code == 404  # not even the patient
    with database_engine(database).connect() as connection:
        assert pd.read_sql_table("lesions", connection).empty and pd.read_sql_table("scores", connection).empty
    assert service.sweep_orphans(older_than_seconds=0) == 2  # the images nothing refers to
    assert not [p for p in (tmp_path / "store").rglob("*") if p.is_file()]


def test_gradcam_and_offline_docs(client: TestClient, images: list) -> None:
    lesion = _upload(client, "P6", images[:1]).json()["lesions"][0]["lesion_id"]
    first = client.get(f"/api/v1/lesions/{lesion}/gradcam.png", headers=AUTH)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(first.content)).size == Image.open(io.BytesIO(images[0][1])).size
    assert client.get(f"/api/v1/lesions/{lesion}/gradcam.png", headers=AUTH).content == first.content  # cached
    docs = client.get("/docs", headers=AUTH)
    assert docs.status_code == 200 and "/api/v1/patients/{patient_id}/lesions" in docs.text and "http" not in docs.text.split("<main>")[1].split("openapi.json")[0]
    assert "/api/v1/worklist" in client.get("/openapi.json", headers=AUTH).json()["paths"]


def test_a_browser_uploads_two_images_and_finds_the_alert(browser, bundle_dir: Path, tmp_path: Path, images: list) -> None:  # noqa: ANN001
    import uvicorn

    app = create_app(_service(bundle_dir, f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "store"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    files = []
    for name, content in images[:2]:
        files.append(tmp_path / name)
        files[-1].write_bytes(content)
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        page.fill("#patient_id", "WEB1")
        page.set_input_files("#files", [str(f) for f in files])
        page.fill("#age", "64")
        page.select_option("#sex", "female")
        page.select_option("#site", "torso")
        page.click("button[type=submit]")
        page.wait_for_url("**/patients/WEB1")
        assert page.locator("tr[data-lesion]").count() == 2
        alerted = page.locator(".badge.alert").count()
        assert alerted >= 1, page.content()
        page.locator("details summary").first.click()  # the Grad-CAM toggle
        page.wait_for_function("() => { const i = document.querySelector('details[open] img'); return i && i.complete && i.naturalWidth > 0; }")
        page.goto(f"http://127.0.0.1:{port}/worklist")
        assert page.locator("tr[data-lesion]").count() == alerted
        page.click("button:has-text('Save review')")
        page.wait_for_url("**/worklist")
        assert page.locator("tr[data-lesion]").count() == alerted - 1
    finally:
        page.close()
        server.should_exit = True
        thread.join(timeout=10)


def test_serve_refuses_a_shared_database_without_a_shared_image_folder(bundle_dir: Path) -> None:
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, ["serve", "--bundle", str(bundle_dir), "--database", "postgresql+psycopg://u@db/triage"])
    assert result.exit_code == 2 and "--store" in result.output
    result = CliRunner().invoke(app, ["serve", "--bundle", str(bundle_dir / "nowhere")])
    assert result.exit_code == 2 and "not a bundle" in result.output
