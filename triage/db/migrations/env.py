"""Alembic's environment: the engine comes from `triage.db.engine.alembic_config` (no alembic.ini)."""

from alembic import context

from triage.db.models import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
