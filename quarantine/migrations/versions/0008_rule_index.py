"""Pages of one rule's mail are read from an index: (rule, state, id).

An earlier text of 0006 created this index itself, so a store that ran it has it
already: created only where it is missing.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_messages_rule_state_id"),
        "messages",
        ["rule", "state", "id"],
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_messages_rule_state_id"), table_name="messages", if_exists=True)
