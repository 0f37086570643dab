"""Known recipient domains in their own table, filled from what was delivered.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "known_domains",
        sa.Column("domain", sa.String(length=255), nullable=False),
        sa.Column("first_delivered_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("domain", name=op.f("pk_known_domains")),
    )
    op.execute(
        "INSERT INTO known_domains (domain, first_delivered_at) "
        "SELECT lower(domain), min(coalesce(finished_at, updated_at)) FROM recipients "
        "WHERE state = 'delivered' GROUP BY lower(domain)"
    )


def downgrade() -> None:
    op.drop_table("known_domains")
