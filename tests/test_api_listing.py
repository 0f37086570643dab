"""Listing held mail at scale: what the page costs does not grow with the store."""

from __future__ import annotations

import gc
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import column as sa_column
from sqlalchemy import event, select, text
from sqlalchemy import table as sa_table

from gateway.approvals import Approvals, Principal, may_see
from gateway.config import ApprovalConfig
from gateway.http_api import create_app
from gateway.ids import new_id
from quarantine import repository as repo
from quarantine.accounts import Role
from quarantine.approvals import Filters
from quarantine.db import Store
from quarantine.migrate import upgrade
from quarantine.models import Message, approvers_key
from quarantine.states import MessageState


async def test_the_start_up_heap_is_out_of_the_collectors_reach(tmp_path: Path) -> None:
    """A full collection must not walk what start-up built (a ~100 ms pause every
    ~140 listing requests was the listing's p99)."""
    store = Store(f"sqlite:///{tmp_path / 'sekisho.db'}")
    gc.unfreeze()
    try:
        create_app(store)
        assert gc.get_freeze_count() > 10_000
        assert gc.get_count()[2] == 0  # collected just before, so no garbage was frozen
    finally:
        await store.close()


# --- the scoped listing ---------------------------------------------------------------

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)


def _verdict(action: str, approvers: list[str] | None = None) -> dict[str, Any]:
    verdict: dict[str, Any] = {"action": action, "rule": "r", "reason": "", "trace": []}
    if approvers is not None:
        verdict["approvers"] = approvers
    return verdict


# (state, verdict, sender_user, mail_from): every way a message may be visible or not.
KINDS: list[tuple[MessageState, dict[str, Any], str | None, str]] = [
    (MessageState.HELD, _verdict("hold", ["group:compliance"]), "alice", "alice@example.com"),
    (MessageState.HELD, _verdict("hold", ["user:boss", "group:legal"]), None, "x@example.com"),
    (MessageState.HELD, _verdict("hold", ["group:legal"]), "alice", "alice@example.com"),
    (MessageState.HELD, _verdict("hold", []), "alice", "alice@example.com"),  # defaults
    (MessageState.HELD, _verdict("hold"), "carol", "carol@example.com"),  # defaults
    (MessageState.DELAYED, _verdict("delay", ["group:compliance"]), "alice", "a@example.com"),
    (MessageState.DELAYED, _verdict("delay", []), "alice", "alice@example.com"),
    (MessageState.HELD, _verdict("deliver"), "alice", "alice@example.com"),  # at delivery
    (MessageState.QUEUED, _verdict("deliver"), "alice", "alice@example.com"),
    (MessageState.DELIVERED, _verdict("deliver"), "boss", "boss@example.com"),
    (MessageState.DELIVERED, _verdict("deliver"), None, "Boss@Example.COM"),  # own, by address
    (MessageState.HELD, _verdict("hold", ["group:legal"]), None, "BOSS@example.com"),
    (MessageState.REJECTED, _verdict("hold", ["group:compliance"]), "alice", "a@example.com"),
    (MessageState.QUEUED, _verdict("hold", ['"group:compliance"%']), "x", "x@example.com"),
]

PEOPLE = [
    Principal("root", Role.ADMIN),
    Principal("audit", Role.AUDITOR),
    Principal("boss", Role.APPROVER, ("compliance",), ("boss@example.com",)),
    Principal("lee", Role.APPROVER, ("legal",)),
    Principal("dana", Role.APPROVER, ("approvers",)),  # the default approvers
    Principal("esc", Role.APPROVER, ("oncall",)),  # escalate_to
    Principal("nobody", Role.APPROVER, ("nothing",)),
    Principal("alice", Role.SENDER, (), ("alice@example.com",)),
    Principal("carol", Role.SENDER, (), ("carol@example.com",)),
]


async def _stored(store: Store) -> list[Message]:
    """Two of each kind, one created long ago (for escalation), through the insert
    path intake uses."""
    async with store.transaction() as session:
        for n, (state, verdict, user, mail_from) in enumerate(KINDS * 2):
            at = NOW - (timedelta(days=2) if n < len(KINDS) else timedelta(minutes=5))
            new = repo.NewMessage(
                id=new_id(int(at.timestamp() * 1000) + n),
                mail_from=mail_from,
                rcpt_tos=["b@client.example"],
                raw=b"Subject: t\r\n\r\nx\r\n",
                state=state,
                verdict=verdict,
                sender_user=user,
            )
            await repo.add_message(session, new, at)
    async with store.read() as session:
        return list((await session.scalars(select(Message).order_by(Message.id))).all())


async def _everything_visible(
    approvals: Approvals, user: Principal, filters: Filters, limit: int
) -> list[str]:
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(100):
        page = await approvals.list_messages(user, filters, after=cursor, limit=limit)
        seen += [v.message.id for v in page.items]
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor
    raise AssertionError("the cursor never ended")


async def test_scoped_listing_shows_exactly_what_each_person_may_see(store_url: str) -> None:
    """Page by page, with and without a state filter, each person gets what `may_see`
    allows, in id order: admins all, approvers what names them or (as default
    approvers) names nobody, senders their own mail by login or address."""
    store = Store(store_url)
    await upgrade(store)
    config = ApprovalConfig(
        default_approvers=("group:approvers",),
        escalate_after=timedelta(days=1),
        escalate_to=("group:oncall",),
    )
    approvals = Approvals(store, None, config, lambda: NOW)
    try:
        stored = await _stored(store)
        for user in PEOPLE:
            for state in (None, MessageState.HELD, MessageState.DELAYED):
                expected = [
                    m.id
                    for m in stored
                    if may_see(user, m, config, NOW) and state in (None, m.state)
                ]
                for limit in (1, 3, 50):
                    got = await _everything_visible(approvals, user, Filters(state=state), limit)
                    assert got == expected, (user.name, state, limit)
        assert await _everything_visible(approvals, PEOPLE[6], Filters(), 50) == []
    finally:
        await store.close()


async def test_sender_filter_matches_the_address_in_any_case(store_url: str) -> None:
    store = Store(store_url)
    await upgrade(store)
    approvals = Approvals(store, None, ApprovalConfig(), lambda: NOW)
    try:
        stored = await _stored(store)
        got = await _everything_visible(approvals, PEOPLE[0], Filters(sender="BOSS@example.com"), 5)
        expected = [
            m.id
            for m in stored
            if m.sender_user == "BOSS@example.com" or m.mail_from.lower() == "boss@example.com"
        ]
        assert got == expected and len(expected) == 6
    finally:
        await store.close()


async def test_migration_0006_backfills_what_an_insert_derives(store_url: str) -> None:
    """Rows stored before 0006 get the approver list and lower-case sender an insert
    derives now, so the listing finds them."""
    store = Store(store_url)
    await upgrade(store, "0005")
    verdicts = [verdict for _, verdict, _, _ in KINDS]
    rows = [
        {
            "id": new_id(int(NOW.timestamp() * 1000) + n),
            "created_at": NOW.replace(tzinfo=None),
            "updated_at": NOW.replace(tzinfo=None),
            "state": "held",
            "kind": "message",
            "mail_from": f"Ünïcode.Sender{n}@Example.COM",
            "size": 1,
            "verdict": json.dumps(verdict),
            "attachments": "[]",
        }
        for n, verdict in enumerate(verdicts)
    ]
    columns = [sa_column(name) for name in rows[0]]
    try:
        async with store.transaction() as session:
            await session.execute(sa_table("messages", *columns).insert(), rows)
        await upgrade(store)
        async with store.read() as session:
            stored = (await session.scalars(select(Message).order_by(Message.id))).all()
        assert [(m.approvers, m.sender_address) for m in stored] == [
            (approvers_key(verdict), row["mail_from"].lower())
            for verdict, row in zip(verdicts, rows, strict=True)
        ]
        assert stored[0].approvers == '["group:compliance"]'
        assert stored[7].approvers is None  # a deliver verdict names no approvers
    finally:
        await store.close()


# A search on the primary key or an index that starts with a scope's (or the rule's)
# column, never the (state, id) index: that one walks every held message to find a few.
INDEXED = (
    r"^SEARCH (messages|m) USING (COVERING )?INDEX (sqlite_autoindex_messages_1|"
    r"ix_messages_(sender_user|sender_address|approvers|rule)_state_id) "
)


async def test_a_scoped_page_is_read_from_indexes_on_sqlite(tmp_path: Path) -> None:
    """Every statement of an approver's or sender's listing searches an index: none
    walks the messages table or sorts it (SQLite plans without statistics, so the
    plan on a few rows is the plan on a million)."""
    store = Store(f"sqlite:///{tmp_path / 'sekisho.db'}")
    await upgrade(store)
    config = ApprovalConfig(default_approvers=("group:approvers",))
    approvals = Approvals(store, None, config, lambda: NOW)
    statements: list[tuple[str, Any]] = []

    def seen(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM messages" in statement:  # not the page's recipients and decisions
            statements.append((statement, parameters))

    try:
        stored = await _stored(store)
        event.listen(store.engine.sync_engine, "before_cursor_execute", seen)
        for user in (PEOPLE[2], PEOPLE[4], PEOPLE[7]):
            for filters in (Filters(state=MessageState.HELD), Filters(), Filters(rule="r")):
                await approvals.list_messages(user, filters, after=stored[3].id, limit=2)
        # and an admin's page of one rule, however rare
        await approvals.list_messages(
            PEOPLE[0], Filters(MessageState.HELD, rule="r"), after=None, limit=2
        )
        event.remove(store.engine.sync_engine, "before_cursor_execute", seen)
        assert len(statements) >= 10
        async with store.engine.connect() as connection:
            for statement, parameters in statements:
                plan = await connection.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + statement, parameters
                )
                steps = [row[-1] for row in plan]
                walks = [s for s in steps if re.match(r"(SCAN|SEARCH) (messages|m)\b", s)]
                assert walks, (statement, steps)
                assert all(re.search(INDEXED, s) for s in walks), (statement, steps)
                assert not [s for s in steps if "TEMP B-TREE" in s], (statement, steps)
    finally:
        await store.close()


async def _indexes(store: Store) -> set[str]:
    from sqlalchemy import inspect as sa_inspect

    async with store.engine.connect() as connection:
        found = await connection.run_sync(
            lambda sync: sa_inspect(sync).get_indexes("messages")  # type: ignore[no-any-return]
        )
    return {index["name"] for index in found}


async def test_migration_0008_adds_the_rule_index_0006_did_not_make(store_url: str) -> None:
    store = Store(store_url)
    try:
        await upgrade(store, "0007")
        assert "ix_messages_rule_state_id" not in await _indexes(store)
        await upgrade(store)
        assert "ix_messages_rule_state_id" in await _indexes(store)
    finally:
        await store.close()


async def test_migration_0008_leaves_the_rule_index_a_later_text_of_0006_made(
    store_url: str,
) -> None:
    store = Store(store_url)
    try:
        await upgrade(store, "0007")
        async with store.transaction() as session:
            await session.execute(
                text("CREATE INDEX ix_messages_rule_state_id ON messages (rule, state, id)")
            )
        await upgrade(store)
        assert "ix_messages_rule_state_id" in await _indexes(store)
    finally:
        await store.close()
