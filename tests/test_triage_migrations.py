"""The triage database's migrations: they agree with the models, they take a database made by the first
version (before migrations) to the current schema with its rows kept, and the service refuses a
database behind the code, naming the command that migrates it. On SQLite and a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from typer.testing import CliRunner

from cli import app
from errors import UserError
from triage.db.engine import alembic_config, database_engine, head_revision, migrate, require_current, schema_state
from triage.db.models import Base

# What the first version's `create_all` made on SQLite (its models at commit a314954, as SQLite printed them).
FIRST_VERSION_SQLITE = """
CREATE TABLE patients (patient_id VARCHAR(128) NOT NULL, created_at DATETIME NOT NULL, PRIMARY KEY (patient_id));
CREATE TABLE lesions (lesion_id INTEGER NOT NULL, patient_id VARCHAR(128) NOT NULL, image_sha256 VARCHAR(64) NOT NULL,
  image_suffix VARCHAR(8) NOT NULL, file_name VARCHAR(255) NOT NULL, age FLOAT, sex VARCHAR(16), site VARCHAR(32),
  uploaded_at DATETIME NOT NULL, uploaded_by VARCHAR(64) NOT NULL, PRIMARY KEY (lesion_id), FOREIGN KEY(patient_id) REFERENCES patients (patient_id));
CREATE INDEX ix_lesions_image_sha256 ON lesions (image_sha256);
CREATE INDEX ix_lesions_patient_id ON lesions (patient_id);
CREATE TABLE scores (score_id INTEGER NOT NULL, lesion_id INTEGER NOT NULL, bundle_sha256 VARCHAR(64) NOT NULL, bundle_version VARCHAR(64) NOT NULL,
  melanoma_probability FLOAT NOT NULL, alert BOOLEAN NOT NULL, alert_threshold FLOAT NOT NULL, rank_in_patient INTEGER NOT NULL,
  diagnosis JSON NOT NULL, missing_metadata JSON NOT NULL, scored_at DATETIME NOT NULL, scored_by VARCHAR(64) NOT NULL,
  PRIMARY KEY (score_id), FOREIGN KEY(lesion_id) REFERENCES lesions (lesion_id));
CREATE INDEX ix_scores_lesion_id ON scores (lesion_id);
CREATE TABLE reviews (review_id INTEGER NOT NULL, lesion_id INTEGER NOT NULL, score_id INTEGER, outcome VARCHAR(16) NOT NULL, note TEXT NOT NULL,
  reviewed_at DATETIME NOT NULL, reviewed_by VARCHAR(64) NOT NULL, PRIMARY KEY (review_id), FOREIGN KEY(lesion_id) REFERENCES lesions (lesion_id),
  FOREIGN KEY(score_id) REFERENCES scores (score_id));
CREATE INDEX ix_reviews_lesion_id ON reviews (lesion_id);
"""
ROWS = """
INSERT INTO patients VALUES ('P1', '2026-01-02 10:00:00');
INSERT INTO lesions (lesion_id, patient_id, image_sha256, image_suffix, file_name, age, sex, site, uploaded_at, uploaded_by)
  VALUES (1, 'P1', 'aa', '.jpg', 'a.jpg', 61.0, 'male', 'torso', '2026-01-02 10:00:00', 'dr-a'),
         (2, 'P1', 'bb', '.jpg', 'b.jpg', 61.0, 'male', 'torso', '2026-01-02 10:05:00', 'dr-a');
INSERT INTO scores (score_id, lesion_id, bundle_sha256, bundle_version, melanoma_probability, alert, alert_threshold, rank_in_patient,
  diagnosis, missing_metadata, scored_at, scored_by)
  VALUES (1, 1, 'b', 'v', 0.2, false, 0.5, 1, '{}', '[]', '2026-01-02 10:00:00', 'dr-a'),
         (2, 1, 'b', 'v', 0.3, false, 0.5, 2, '{}', '[]', '2026-01-02 10:05:00', 'dr-a'),
         (3, 2, 'b', 'v', 0.7, true, 0.5, 1, '{}', '[]', '2026-01-02 10:05:00', 'dr-a');
INSERT INTO reviews (review_id, lesion_id, score_id, outcome, note, reviewed_at, reviewed_by) VALUES (1, 2, 3, 'biopsy', 'soon', '2026-01-03 09:00:00', 'dr-b');
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triage.db'}"
    url = request.getfixturevalue("postgres_url")
    with database_engine(url).begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    return url


def _first_version_database(url: str) -> None:
    """A database as the first version left it: its four tables (no alembic_version) and some rows."""
    engine = database_engine(url)
    if engine.dialect.name == "sqlite":
        statements = FIRST_VERSION_SQLITE
    else:  # the same tables, made by the baseline revision, then stripped of the version table
        command.upgrade(alembic_config(engine), "0001")
        statements = "DROP TABLE alembic_version;"
    with engine.begin() as connection:
        for statement in filter(str.strip, (statements + ROWS).split(";")):
            connection.execute(text(statement))


def test_the_models_and_the_migrations_agree(empty_database: str) -> None:
    engine = database_engine(empty_database)
    assert migrate(engine) == ("empty", head_revision())
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert schema_state(engine) == "current"


def test_a_first_version_database_is_migrated_with_its_rows_kept(empty_database: str) -> None:
    _first_version_database(empty_database)
    engine = database_engine(empty_database)
    assert schema_state(engine) == "unversioned"
    with pytest.raises(UserError, match="python cli.py migrate --database"):
        require_current(engine, empty_database)
    result = CliRunner().invoke(app, ["migrate", "--database", empty_database])
    assert result.exit_code == 0, result.output
    assert schema_state(engine) == "current"
    with engine.connect() as connection:
        lesions = pd.read_sql("SELECT lesion_id, latest_score_id FROM lesions ORDER BY lesion_id", connection)
        assert lesions["latest_score_id"].tolist() == [2, 3]  # each lesion points at its newest score
        assert pd.read_sql("SELECT COUNT(*) AS n FROM scores", connection)["n"].item() == 3
        assert pd.read_sql("SELECT note FROM reviews", connection)["note"].tolist() == ["soon"]
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    assert CliRunner().invoke(app, ["migrate", "--database", empty_database]).exit_code == 0  # a second run has nothing to do


def test_the_service_refuses_a_database_behind_the_code(empty_database: str, bundle_dir: Path, tmp_path: Path) -> None:
    engine = database_engine(empty_database)
    command.upgrade(alembic_config(engine), "0001")
    from triage.http.app import build_service
    from triage.settings import Settings

    with pytest.raises(UserError, match="is behind this version's schema; run `python cli.py migrate"):
        build_service(Settings(bundle=bundle_dir, database=empty_database, store=tmp_path / "store"))
