"""A message's recipients in one state are read from (message_id, state).

It replaces the index on message_id alone, which it covers. With only that one,
SQLite took `state = ?` to the (state, next_attempt_at) index and walked every
recipient in that state: finishing a message read all delivered recipients stored.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_recipients_message_id_state"), "recipients", ["message_id", "state"])
    op.drop_index(op.f("ix_recipients_message_id"), table_name="recipients")


def downgrade() -> None:
    op.create_index(op.f("ix_recipients_message_id"), "recipients", ["message_id"])
    op.drop_index(op.f("ix_recipients_message_id_state"), table_name="recipients")
