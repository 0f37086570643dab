"""Index messages by (state, id), the order the API pages in.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_messages_state_id"), "messages", ["state", "id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_messages_state_id"), table_name="messages")
