"""Per-lesion inputs cached per (image, bundle); each lesion's current score; the record of reads; page sessions.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("lesions") as lesions:
        lesions.add_column(sa.Column("latest_score_id", sa.Integer, nullable=True))
        lesions.create_index("ix_lesions_latest_score_id", ["latest_score_id"])
    # every lesion scored before points at its newest score
    op.execute("UPDATE lesions SET latest_score_id = (SELECT MAX(scores.score_id) FROM scores WHERE scores.lesion_id = lesions.lesion_id)")
    op.create_table(
        "lesion_inputs",
        sa.Column("image_sha256", sa.String(64), primary_key=True),
        sa.Column("bundle_sha256", sa.String(64), primary_key=True),
        sa.Column("cnn_outputs", sa.JSON, nullable=False),
        sa.Column("image_features", sa.JSON, nullable=True),
        sa.Column("diagnosis", sa.JSON, nullable=False),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "read_records",
        sa.Column("record_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("route", sa.String(255), nullable=False),
        sa.Column("patient_id", sa.String(128), nullable=True),
        sa.Column("lesion_id", sa.Integer, nullable=True),
        sa.Column("request_id", sa.String(32), nullable=False),
    )
    op.create_index("ix_read_records_read_at", "read_records", ["read_at"])
    op.create_index("ix_read_records_patient_id", "read_records", ["patient_id"])
    op.create_table(
        "page_sessions",
        sa.Column("session_sha256", sa.String(64), primary_key=True),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    for table in ("page_sessions", "read_records", "lesion_inputs"):
        op.drop_table(table)
    with op.batch_alter_table("lesions") as lesions:
        lesions.drop_index("ix_lesions_latest_score_id")
        lesions.drop_column("latest_score_id")
