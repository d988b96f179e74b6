"""Durable steps, event waits and events.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reliable_steps",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("result", sa.Text),
        sa.Column("error", sa.Text),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double),
        sa.PrimaryKeyConstraint("job_id", "name"),
    )
    op.create_table(
        "reliable_waits",
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("step", sa.String(200), nullable=False),
        sa.Column("event", sa.String(200), nullable=False),
        sa.Column("match", sa.Text),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double),
        sa.PrimaryKeyConstraint("job_id", "step"),
    )
    op.create_index("ix_reliable_waits_event", "reliable_waits", ["event"])
    op.create_table(
        "reliable_events",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_index("ix_reliable_events_name_created", "reliable_events", ["name", "created_at"])


def downgrade() -> None:
    op.drop_table("reliable_events")
    op.drop_table("reliable_waits")
    op.drop_table("reliable_steps")
