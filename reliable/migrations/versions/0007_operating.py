"""What operators need: manual retries with a fresh attempt budget, replays that name
their original, cancel-on-event, paused tasks and queues, listings newest first, and the
tasks each worker runs.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("reliable_jobs") as batch:
        batch.add_column(
            sa.Column("attempt_base", sa.Integer, nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(sa.Column("replay_of", sa.String(32)))
        batch.add_column(sa.Column("cancel_on", sa.String(200)))
        batch.add_column(sa.Column("cancel_match", sa.Text))
    op.create_index("ix_reliable_jobs_created", "reliable_jobs", ["created_at", "id"])
    op.create_index(
        "ix_reliable_jobs_cancel_on",
        "reliable_jobs",
        ["cancel_on"],
        sqlite_where=sa.text("cancel_on IS NOT NULL"),
        postgresql_where=sa.text("cancel_on IS NOT NULL"),
    )
    op.create_table(
        "reliable_pauses",
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("paused_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("kind", "name"),
    )
    with op.batch_alter_table("reliable_workers") as batch:
        batch.add_column(sa.Column("tasks", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("reliable_workers") as batch:
        batch.drop_column("tasks")
    op.drop_table("reliable_pauses")
    op.drop_index("ix_reliable_jobs_cancel_on", "reliable_jobs")
    op.drop_index("ix_reliable_jobs_created", "reliable_jobs")
    with op.batch_alter_table("reliable_jobs") as batch:
        batch.drop_column("cancel_match")
        batch.drop_column("cancel_on")
        batch.drop_column("replay_of")
        batch.drop_column("attempt_base")
