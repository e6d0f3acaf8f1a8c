"""The database engine, and the schema version it must be at.

A database is migrated, never patched at start: `python cli.py migrate --database URL` takes a
database made by any earlier version (one made before migrations existed is recognised by its
tables and stamped at the baseline first) to the code's head revision, and the service refuses to
start on a database behind the code, naming that command.

>>> url = "sqlite://"  # in memory
>>> engine = database_engine(url)
>>> schema_state(engine)
'empty'
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url

from errors import RunStateError

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001"  # the schema of the first version, made by `create_all` before there were migrations
BASELINE_TABLES = frozenset({"patients", "lesions", "scores", "reviews"})
SQLITE_BUSY_SECONDS = 30  # how long a SQLite writer waits for another (the bounded wait on one patient)


def database_engine(url: str) -> Engine:
    """An engine: SQLite gets WAL mode, foreign keys and a bounded busy wait; other servers a liveness check."""
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    database = make_url(url).database
    if is_sqlite and database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_SECONDS, "check_same_thread": False} if is_sqlite else {}, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record) -> None:  # noqa: ANN001
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=FULL")  # a committed row survives a power loss
            cursor.close()
    return engine


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config(create_engine("sqlite://"))).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def schema_state(engine: Engine) -> str:
    """`empty`, `unversioned` (made by the first version, before migrations), `behind`, `current` or `ahead`."""
    tables = set(inspect(engine).get_table_names())
    revision = current_revision(engine)
    if revision is None:
        return "unversioned" if BASELINE_TABLES <= tables else "empty"
    script = ScriptDirectory.from_config(alembic_config(engine))
    if revision == script.get_current_head():
        return "current"
    known = {r.revision for r in script.walk_revisions()}
    return "behind" if revision in known else "ahead"


def migrate(engine: Engine) -> tuple[str, str]:
    """Take the database to the head revision; (the state it was in, the revision it is at now)."""
    state = schema_state(engine)
    if state == "ahead":
        raise RunStateError(f"the database is at revision {current_revision(engine)}, which this version does not know: it was migrated by a newer one.")
    config = alembic_config(engine)
    if state == "unversioned":
        command.stamp(config, BASELINE)
    command.upgrade(config, "head")
    return state, head_revision()


def require_current(engine: Engine, url: str) -> None:
    """Refuse a database the code cannot use as it is, naming the command that fixes it."""
    state = schema_state(engine)
    if state != "current":
        where = url.split("@")[-1]
        fix = f"python cli.py migrate --database {url if '@' not in url else '...@' + where}"
        why = {"empty": "has no tables yet", "unversioned": "was made by an earlier version", "behind": "is behind this version's schema",
               "ahead": "was migrated by a newer version"}[state]
        raise RunStateError(f"the database {where} {why}; " + ("upgrade the service." if state == "ahead" else f"run `{fix}` first."))


def ping(engine: Engine) -> bool:
    with engine.connect() as connection:
        return connection.execute(text("SELECT 1")).scalar() == 1
