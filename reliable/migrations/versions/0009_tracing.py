"""Tracing: the trace context of the span that enqueued a job (W3C ``traceparent``),
so that its attempts' spans join that trace.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: SQLite adds it in place, no table copy.
    with op.batch_alter_table("reliable_jobs") as batch:
        batch.add_column(sa.Column("trace_context", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("reliable_jobs") as batch:
        batch.drop_column("trace_context")
