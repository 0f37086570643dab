"""Who may see a message, as indexed columns: the approver list a hold or delay names,
and the sender's address in lower case. Backfilled from the verdict and MAIL FROM.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BATCH = 5000

# The columns as they stand in this revision, not as the models may grow later.
messages = sa.table(
    "messages",
    sa.column("id", sa.String),
    sa.column("mail_from", sa.Text),
    sa.column("verdict", sa.Text),
    sa.column("approvers", sa.Text),
    sa.column("sender_address", sa.Text),
)


def upgrade() -> None:
    op.add_column("messages", sa.Column("approvers", sa.Text(), nullable=True))
    op.add_column("messages", sa.Column("sender_address", sa.Text(), nullable=True))
    _backfill(op.get_bind())
    op.drop_index(op.f("ix_messages_sender_user_created_at"), table_name="messages")
    for column in ("sender_user", "sender_address", "approvers"):
        op.create_index(op.f(f"ix_messages_{column}_state_id"), "messages", [column, "state", "id"])


def downgrade() -> None:
    for column in ("sender_user", "sender_address", "approvers"):
        op.drop_index(op.f(f"ix_messages_{column}_state_id"), table_name="messages")
    op.create_index(
        op.f("ix_messages_sender_user_created_at"), "messages", ["sender_user", "created_at"]
    )
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("sender_address")
        batch.drop_column("approvers")


def _approvers_key(verdict: dict[str, Any]) -> str | None:
    # As quarantine.models.approvers_key at this revision; copied, so that a later
    # change to the model cannot change what this migration wrote.
    if verdict.get("action") not in ("hold", "delay"):
        return None
    return json.dumps([str(a) for a in verdict.get("approvers") or ()])


def _backfill(connection: sa.Connection) -> None:
    """In batches by id. Python computes both values, exactly as an insert does
    (`str.lower` is Unicode-aware where SQL `lower` may not be)."""
    after = ""
    while True:
        rows = connection.execute(
            sa.select(messages.c.id, messages.c.mail_from, messages.c.verdict)
            .where(messages.c.id > after)
            .order_by(messages.c.id)
            .limit(BATCH)
        ).all()
        if not rows:
            return
        connection.execute(
            messages.update()
            .where(messages.c.id == sa.bindparam("mid"))
            .values(approvers=sa.bindparam("a"), sender_address=sa.bindparam("s")),
            [
                {"mid": mid, "a": _approvers_key(_parse(verdict)), "s": mail_from.lower()}
                for mid, mail_from, verdict in rows
            ],
        )
        after = rows[-1].id


def _parse(verdict: Any) -> dict[str, Any]:
    value = json.loads(verdict) if isinstance(verdict, str | bytes) else verdict
    return value if isinstance(value, dict) else {}
