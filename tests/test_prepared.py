"""SQLite's hot path runs its statements on the DB-API cursor (`quarantine.prepared`);
what it stores must be exactly what the SQLAlchemy path stores, value for value."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, insert
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from quarantine import prepared
from quarantine import repository as repo
from quarantine.db import Store
from quarantine.migrate import upgrade
from quarantine.models import Message
from quarantine.prepared import Prepared
from quarantine.repository import Lease, NewMessage, OutcomeRow
from quarantine.states import MessageState, RecipientState
from tests.conftest import queued

NOW = datetime(2026, 11, 24, 9, 30, 15, 123456, tzinfo=UTC)


def _batch() -> list[tuple[NewMessage, datetime]]:
    held = NewMessage(
        id="held1",
        mail_from="Carol.Sales@Example.com",
        rcpt_tos=["x@client.example", "y@other.example"],
        raw=b"Subject: quote\r\n\r\nbody\r\n",
        state=MessageState.HELD,
        verdict={"action": "hold", "approvers": ["boss@example.com"], "reasons": ["pii"]},
        subject="quote — 見積",
        rule="pii",
        attachments=[{"filename": "a.csv", "size": 10}],
        sender_user="carol",
        client_address="192.0.2.7",
        helo="laptop.example",
        release_at=NOW + timedelta(days=3),
    )
    return [
        (queued("sent1", "a@client.example", "b@client.example"), NOW),
        (held, NOW + timedelta(microseconds=7)),
        (queued("sent2", "c@third.example", sender=""), NOW),
    ]


def _dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every stored value as SQLite holds it, table by table."""
    with sqlite3.connect(path) as db:
        return {
            table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            for table in ("messages", "bodies", "recipients")
        }


async def _store_and_deliver(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    store = Store(f"sqlite:///{path}")
    try:
        await upgrade(store)
        batch = _batch()
        lease = Lease("gw", NOW + timedelta(minutes=5), {"sent1", "sent2"})
        claims = await store.run(lambda session: repo.add_messages(session, batch, lease))
        a, b = claims[0].recipients
        (c,) = claims[1].recipients
        outcomes = [
            OutcomeRow(a.id, RecipientState.DELIVERED, 250, "2.0.0 ok"),
            OutcomeRow(b.id, RecipientState.BOUNCED, 550, "5.1.1 no such user"),
            OutcomeRow(c.id, RecipientState.DEFERRED, 451, "4.3.0 later", NOW + timedelta(1)),
        ]

        def record(session: Session) -> tuple[set[int], list[tuple[str, MessageState]]]:
            kept = repo.record_outcomes(session, outcomes, owner="gw", now=NOW)
            return kept, repo.finish_messages(session, ["sent1", "sent2", "held1"], NOW)

        kept, finished = await store.run(record, durable=False)
        assert kept == {a.id, b.id, c.id}
        assert finished == [("sent1", MessageState.DELIVERED)]
    finally:
        await store.close()
    return _dump(path)


async def test_the_cursor_stores_what_sqlalchemy_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_cursor = await _store_and_deliver(tmp_path / "cursor.db")
    monkeypatch.setattr(prepared, "direct", lambda _conn: False)
    monkeypatch.setattr(repo, "direct", lambda _conn: False)
    through_sqlalchemy = await _store_and_deliver(tmp_path / "sqlalchemy.db")
    assert on_cursor == through_sqlalchemy
    messages = {row[0]: row for row in on_cursor["messages"]}
    assert set(messages) == {"held1", "sent1", "sent2"}
    assert len(on_cursor["recipients"]) == 5


async def test_sqlite_runs_the_hot_statements_on_the_cursor(tmp_path: Path) -> None:
    # SQLAlchemy sees no statement of accepting, recording and finishing (each it
    # executes costs ~60 µs of the store thread on top of SQLite's own work).
    seen: list[str] = []

    def executing(*args: Any) -> None:
        seen.append(args[2])

    store = Store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        await upgrade(store)
        lease = Lease("gw", NOW + timedelta(minutes=5), {"m1"})
        new = queued("m1", "a@client.example")

        def work(session: Session) -> None:
            session.connection()  # the transaction's begin is SQLAlchemy's, and not counted
            event.listen(Engine, "before_cursor_execute", executing)
            try:
                (claim,) = repo.add_messages(session, [(new, NOW)], lease)
                (a,) = claim.recipients
                delivered = [OutcomeRow(a.id, RecipientState.DELIVERED, 250, "2.0.0 ok")]
                repo.record_outcomes(session, delivered, owner="gw", now=NOW)
                assert repo.finish_messages(session, ["m1"], NOW) == [
                    ("m1", MessageState.DELIVERED)
                ]
            finally:
                event.remove(Engine, "before_cursor_execute", executing)

        await store.run(work)
    finally:
        await store.close()
    assert seen == []


def test_a_column_with_a_default_must_be_given() -> None:
    # `approvers` and `sender_address` are derived by Python-side defaults, which the
    # cursor path does not run: leaving them out is an error, not a NULL.
    statement = Prepared(insert(Message.__table__), ["id", "mail_from"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="approvers"):
        statement.compiled(SQLiteDialect_pysqlite())
