"""The first version's schema: patients, lesions, scores, reviews (as its `create_all` made them).

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "patients",
        sa.Column("patient_id", sa.String(128), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "lesions",
        sa.Column("lesion_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("patient_id", sa.String(128), sa.ForeignKey("patients.patient_id"), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("image_suffix", sa.String(8), nullable=False),
        sa.Column("file_name", sa.String(255), nullable=False),
        sa.Column("age", sa.Float, nullable=True),
        sa.Column("sex", sa.String(16), nullable=True),
        sa.Column("site", sa.String(32), nullable=True),
        sa.Column("uploaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("uploaded_by", sa.String(64), nullable=False),
    )
    op.create_index("ix_lesions_patient_id", "lesions", ["patient_id"])
    op.create_index("ix_lesions_image_sha256", "lesions", ["image_sha256"])
    op.create_table(
        "scores",
        sa.Column("score_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("lesion_id", sa.Integer, sa.ForeignKey("lesions.lesion_id"), nullable=False),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("bundle_version", sa.String(64), nullable=False),
        sa.Column("melanoma_probability", sa.Float, nullable=False),
        sa.Column("alert", sa.Boolean, nullable=False),
        sa.Column("alert_threshold", sa.Float, nullable=False),
        sa.Column("rank_in_patient", sa.Integer, nullable=False),
        sa.Column("diagnosis", sa.JSON, nullable=False),
        sa.Column("missing_metadata", sa.JSON, nullable=False),
        sa.Column("scored_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scored_by", sa.String(64), nullable=False),
    )
    op.create_index("ix_scores_lesion_id", "scores", ["lesion_id"])
    op.create_table(
        "reviews",
        sa.Column("review_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("lesion_id", sa.Integer, sa.ForeignKey("lesions.lesion_id"), nullable=False),
        sa.Column("score_id", sa.Integer, sa.ForeignKey("scores.score_id"), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reviewed_by", sa.String(64), nullable=False),
    )
    op.create_index("ix_reviews_lesion_id", "reviews", ["lesion_id"])


def downgrade() -> None:
    for table in ("reviews", "scores", "lesions", "patients"):
        op.drop_table(table)
