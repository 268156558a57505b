"""findings and result_objects: what the model found in a job, and the DICOM objects written for it

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from worker.db.types import BigId, UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "findings",
        sa.Column("id", BigId, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("structure", sa.String(8), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("source_sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("column_px", sa.Float(), nullable=False),
        sa.Column("row_px", sa.Float(), nullable=False),
        sa.Column("patient_x_mm", sa.Float(), nullable=True),
        sa.Column("patient_y_mm", sa.Float(), nullable=True),
        sa.Column("patient_z_mm", sa.Float(), nullable=True),
        sa.Column("label", sa.String(4), nullable=False),
        sa.Column("diagnosis", sa.String(32), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_findings_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_findings")),
        sa.UniqueConstraint("job_id", "structure", name=op.f("uq_findings_job_id")),
    )
    op.create_index(op.f("ix_findings_job_id"), "findings", ["job_id"])
    op.create_table(
        "result_objects",
        sa.Column("id", BigId, nullable=False),
        sa.Column("job_id", BigId, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("series_instance_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_result_objects_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_result_objects")),
        sa.UniqueConstraint("sop_instance_uid", name=op.f("uq_result_objects_sop_instance_uid")),
    )
    op.create_index(op.f("ix_result_objects_job_id"), "result_objects", ["job_id"])


def downgrade() -> None:
    op.drop_table("result_objects")
    op.drop_table("findings")
