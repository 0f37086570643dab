"""Delivery's bookkeeping: leases and outcomes are atomic but skip the fsync that
accepting a message pays for, and the outcomes of sends that finish together share
one transaction, without one bad claim failing the others."""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from gateway.transports import Results
from quarantine import repository as repo
from quarantine.db import Store
from quarantine.migrate import upgrade
from quarantine.models import Message, Recipient
from quarantine.repository import NewMessage, OutcomeRow
from quarantine.states import MessageState, RecipientState
from tests.conftest import gateway_config, running

MESSAGE = b"From: alice@example.com\r\nTo: bob@client.example\r\nSubject: hi\r\n\r\nhello\r\n"


async def _sync_setting(store: Store, *, durable: bool) -> str:
    async with store.transaction(durable=durable) as session:
        if store.is_sqlite:
            return str(await session.scalar(text("PRAGMA synchronous")))
        return str(await session.scalar(text("SHOW synchronous_commit")))


async def test_accepting_is_fsynced_and_delivery_bookkeeping_is_not(store_url: str) -> None:
    store = Store(store_url)
    try:
        durable = await _sync_setting(store, durable=True)
        bookkeeping = await _sync_setting(store, durable=False)
        # and the bookkeeping setting does not leak into the next durable transaction
        again = await _sync_setting(store, durable=True)
    finally:
        await store.close()
    if store.is_sqlite:
        assert (durable, bookkeeping, again) == ("2", "1", "2")  # FULL, NORMAL, FULL
    else:
        assert (durable, bookkeeping, again) == ("on", "off", "on")


async def test_an_outcome_is_kept_only_while_its_lease_is_held(store_url: str) -> None:
    store = Store(store_url)
    now = datetime.now(UTC)
    try:
        await upgrade(store)
        async with store.transaction() as session:
            await repo.add_messages(
                session,
                [
                    (
                        NewMessage(
                            id="m1",
                            mail_from="alice@example.com",
                            rcpt_tos=["a@x.example", "b@x.example"],
                            raw=MESSAGE,
                            state=MessageState.QUEUED,
                            verdict={},
                        ),
                        now,
                    )
                ],
            )
        async with store.transaction(durable=False) as session:
            (claim,) = await repo.claim_due(
                session, owner="w1", now=now, lease=timedelta(seconds=1), limit=10
            )
        a, b = claim.recipients
        later = now + timedelta(seconds=2)  # w1's lease ran out and w2 took b over
        async with store.transaction(durable=False) as session:
            (retaken,) = await repo.claim_due(
                session, owner="w2", now=later, lease=timedelta(seconds=60), limit=10
            )
        assert {r.id for r in retaken.recipients} == {a.id, b.id}
        async with store.transaction() as session:
            await session.execute(
                Recipient.__table__.update()
                .where(Recipient.id == a.id)
                .values(lease_owner="w1")  # a is back with w1 (say w2 handed it back)
            )
        rows = [
            OutcomeRow(a.id, RecipientState.DELIVERED, 250, "2.0.0 ok"),
            OutcomeRow(b.id, RecipientState.DELIVERED, 250, "2.0.0 ok"),
        ]
        async with store.transaction(durable=False) as session:
            kept = await repo.record_outcomes(session, rows, owner="w1", now=later)
        assert kept == {a.id}
        async with store.read() as session:
            states = dict(
                (await session.execute(select(Recipient.address, Recipient.state))).all()
            )
        assert states == {"a@x.example": RecipientState.DELIVERED, "b@x.example": "queued"}
    finally:
        await store.close()


class GatedTransport:
    """An upstream that answers nobody until `expected` transactions are waiting, then
    everybody at once: their outcomes reach the recorder in the same instant."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.waiting = 0
        self.gate = asyncio.Event()
        self.sent: list[Sequence[str]] = []

    async def send(self, mail_from: str, rcpts: Sequence[str], data: bytes) -> Results:
        self.waiting += 1
        if self.waiting >= self.expected:
            self.gate.set()
        await asyncio.wait_for(self.gate.wait(), 10)
        self.sent.append(rcpts)
        return {r: (250, "2.0.0 Ok: queued") for r in rcpts}

    async def close(self) -> None:
        return None


def _submit(port: int, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("alice@example.com", [rcpt], MESSAGE)


async def _submit_all(port: int, rcpts: Sequence[str]) -> None:
    await asyncio.gather(*(asyncio.to_thread(_submit, port, r) for r in rcpts))


async def _states(store: Store) -> list[str]:
    async with store.read() as session:
        return [str(s) for s in (await session.scalars(select(Message.state))).all()]


def _events(path: Path, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [e for e in lines if e["event"] == name]


async def test_sends_that_finish_together_are_recorded_in_one_transaction(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = repo.record_outcomes

    async def counting(session: Any, outcomes: Any, **kwargs: Any) -> set[int]:
        rows = list(outcomes)
        calls.append(len(rows))
        return await original(session, rows, **kwargs)

    monkeypatch.setattr(repo, "record_outcomes", counting)
    rcpts = [f"r{i}@client{i}.example" for i in range(8)]
    transport = GatedTransport(expected=len(rcpts))
    config = gateway_config(tmp_path, sqlite_url, None, delivery={"workers": 8, "connections": 8})
    async with running(config, transport=transport) as gw:
        await _submit_all(gw.smtp_port, rcpts)
        for _ in range(200):
            if await _states(gw.store) == ["delivered"] * len(rcpts):
                break
            await asyncio.sleep(0.05)
        assert await _states(gw.store) == ["delivered"] * len(rcpts)
    assert sorted(r for sent in transport.sent for r in sent) == sorted(rcpts)
    # the eight outcomes answered in one instant go in one transaction, not eight
    assert calls == [len(rcpts)]
    assert len(_events(Path(config.audit.path), "delivery.sent")) == len(rcpts)


async def test_a_claim_that_cannot_be_recorded_does_not_fail_the_others(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The poisoned message's outcome cannot be written twice in a row (say its row is
    # locked): the batch is retried claim by claim, the others are recorded once, and
    # the poisoned one, its lease run out, is sent again and recorded then.
    poison = "r0@client0.example"
    failures = 0
    original = repo.record_outcomes

    async def faulty(session: Any, outcomes: Any, **kwargs: Any) -> set[int]:
        nonlocal failures
        rows = list(outcomes)
        ids = {row.recipient_id for row in rows}
        address = dict((await session.execute(select(Recipient.id, Recipient.address))).all())
        if failures < 2 and any(address[i] == poison for i in ids):
            failures += 1
            raise RuntimeError("injected: outcome row locked")
        return await original(session, rows, **kwargs)

    monkeypatch.setattr(repo, "record_outcomes", faulty)
    rcpts = [poison] + [f"r{i}@client{i}.example" for i in range(1, 6)]
    transport = GatedTransport(expected=len(rcpts))
    config = gateway_config(
        tmp_path, sqlite_url, None, delivery={"workers": 8, "connections": 8, "lease": "1s"}
    )
    async with running(config, transport=transport) as gw:
        await _submit_all(gw.smtp_port, rcpts)
        for _ in range(300):
            if await _states(gw.store) == ["delivered"] * len(rcpts):
                break
            await asyncio.sleep(0.05)
        assert await _states(gw.store) == ["delivered"] * len(rcpts)
    sent = [r for batch in transport.sent for r in batch]
    assert failures == 2
    assert sorted(sent) == sorted([*rcpts, poison])  # only the poisoned one went twice
    # the audit log says what was committed: one delivery.sent per recipient
    logged = [e["rcpt"] for e in _events(Path(config.audit.path), "delivery.sent")]
    assert sorted(logged) == sorted(rcpts)
