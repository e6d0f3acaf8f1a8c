"""Ground truth (outcomes); each score's pattern and operating point; each image's statistics (monitoring).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "outcomes",
        sa.Column("outcome_id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("lesion_id", sa.Integer, sa.ForeignKey("lesions.lesion_id"), nullable=False),
        sa.Column("diagnosis", sa.String(32), nullable=False),
        sa.Column("diagnosed_on", sa.Date, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("entered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("entered_by", sa.String(64), nullable=False),
    )
    op.create_index("ix_outcomes_lesion_id", "outcomes", ["lesion_id"])
    with op.batch_alter_table("scores") as scores:
        scores.add_column(sa.Column("pattern", sa.String(32), nullable=True))
        scores.add_column(sa.Column("operating_point", sa.String(32), nullable=True))
        scores.create_index("ix_scores_operating_point", ["operating_point"])
    with op.batch_alter_table("lesion_inputs") as inputs:
        inputs.add_column(sa.Column("image_statistics", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("lesion_inputs") as inputs:
        inputs.drop_column("image_statistics")
    with op.batch_alter_table("scores") as scores:
        scores.drop_index("ix_scores_operating_point")
        scores.drop_column("operating_point")
        scores.drop_column("pattern")
    op.drop_table("outcomes")
