"""Delivery's bookkeeping: leases and outcomes are atomic but skip the fsync that
accepting a message pays for, and the outcomes of sends that finish together share
one transaction, without one bad claim failing the others."""

from __future__ import annotations

import asyncio
import json
import smtplib
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
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
from tests.conftest import MESSAGE, gateway_config, queued, running


async def _claim(
    store: Store, owner: str, now: datetime, lease: timedelta = timedelta(minutes=1)
) -> list[repo.Claim]:
    return await store.run(
        partial(repo.claim_due, owner=owner, now=now, lease=lease, limit=10), durable=False
    )


def _setting_query(store: Store) -> Any:
    return text("PRAGMA synchronous" if store.is_sqlite else "SHOW synchronous_commit")


async def _sync_setting(store: Store, *, durable: bool) -> str:
    async with store.transaction(durable=durable) as session:
        return str(await session.scalar(_setting_query(store)))


async def _sync_setting_in_run(store: Store, *, durable: bool) -> str:
    return await store.run(lambda s: str(s.scalar(_setting_query(store))), durable=durable)


@pytest.mark.parametrize("setting", [_sync_setting, _sync_setting_in_run])
async def test_accepting_is_fsynced_and_delivery_bookkeeping_is_not(
    store_url: str, setting: Any
) -> None:
    store = Store(store_url)
    try:
        durable = await setting(store, durable=True)
        bookkeeping = await setting(store, durable=False)
        # and the bookkeeping setting does not leak into the next durable transaction
        again = await setting(store, durable=True)
    finally:
        await store.close()
    if store.is_sqlite:
        assert (durable, bookkeeping, again) == ("2", "1", "2")  # FULL, NORMAL, FULL
    else:
        assert (durable, bookkeeping, again) == ("on", "off", "on")


async def test_a_hot_path_transaction_is_all_or_nothing(store_url: str) -> None:
    store = Store(store_url)
    now = datetime.now(UTC)
    new = queued("m1", "a@x.example")

    def add_then_fail(session: Any) -> None:
        repo.add_messages(session, [(new, now)])
        raise RuntimeError("injected after the inserts")

    try:
        await upgrade(store)
        with pytest.raises(RuntimeError, match="injected"):
            await store.run(add_then_fail)
        async with store.read() as session:
            assert (await session.scalars(select(Message.id))).all() == []
        await store.run(lambda session: repo.add_messages(session, [(new, now)]))
        async with store.read() as session:
            assert (await session.scalars(select(Message.id))).all() == ["m1"]
    finally:
        await store.close()


async def test_sqlite_runs_a_hot_path_transaction_in_one_hand_off_to_its_own_thread(
    sqlite_url: str,
) -> None:
    store = Store(sqlite_url)
    loop_thread = threading.get_ident()
    try:
        names = {await store.run(lambda _s: threading.current_thread().name) for _ in range(5)}
        ids = {await store.run(lambda _s: threading.get_ident()) for _ in range(5)}
    finally:
        await store.close()
    assert len(names) == 1 and next(iter(names)).startswith("sekisho-store")
    assert len(ids) == 1 and loop_thread not in ids


async def test_an_outcome_is_kept_only_while_its_lease_is_held(store_url: str) -> None:
    store = Store(store_url)
    now = datetime.now(UTC)
    try:
        await upgrade(store)
        new = queued("m1", "a@x.example", "b@x.example")
        await store.run(lambda session: repo.add_messages(session, [(new, now)]))
        (claim,) = await _claim(store, "w1", now, timedelta(seconds=1))
        a, b = claim.recipients
        later = now + timedelta(seconds=2)  # w1's lease ran out and w2 took both over
        (retaken,) = await _claim(store, "w2", later)
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
        kept = await store.run(
            partial(repo.record_outcomes, outcomes=rows, owner="w1", now=later), durable=False
        )
        assert kept == {a.id}
        async with store.read() as session:
            states = dict((await session.execute(select(Recipient.address, Recipient.state))).all())
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

    def counting(session: Any, outcomes: Any, **kwargs: Any) -> set[int]:
        rows = list(outcomes)
        calls.append(len(rows))
        return original(session, rows, **kwargs)

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

    def faulty(session: Any, outcomes: Any, **kwargs: Any) -> set[int]:
        nonlocal failures
        rows = list(outcomes)
        ids = {row.recipient_id for row in rows}
        address = dict(session.execute(select(Recipient.id, Recipient.address)).all())
        if failures < 2 and any(address[i] == poison for i in ids):
            failures += 1
            raise RuntimeError("injected: outcome row locked")
        return original(session, rows, **kwargs)

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


async def test_bodies_round_trip_byte_for_byte_around_the_streaming_size(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On SQLite a body of STREAMED_BODY bytes or more is written through the blob API
    # (one copy less at the commit); what is read back must be the very same bytes.
    streamed: list[str] = []
    original = repo._stream_body

    def spy(session: Any, message_id: str, raw: bytes) -> None:
        streamed.append(message_id)
        original(session, message_id, raw)

    monkeypatch.setattr(repo, "_stream_body", spy)
    store = Store(store_url)
    now = datetime.now(UTC)
    sizes = {"small": repo.STREAMED_BODY - 1, "edge": repo.STREAMED_BODY, "big": 3_000_005}
    pattern = bytes(range(256))
    bodies = {name: (pattern * (size // 256 + 1))[:size] for name, size in sizes.items()}
    batch = [
        (
            queued(name, "a@x.example", raw=body),
            now,
        )
        for name, body in bodies.items()
    ]
    try:
        await upgrade(store)
        await store.run(lambda session: repo.add_messages(session, batch))
        async with store.read() as session:
            stored = {name: await repo.load_raw(session, name) for name in bodies}
    finally:
        await store.close()
    assert stored == bodies
    assert sorted(streamed) == (["big", "edge"] if store.is_sqlite else [])


async def test_a_hold_at_delivery_leaves_the_other_domains_send_in_flight(store_url: str) -> None:
    # One message, two domains: two claims of the same instance. Claim A's protection
    # fails and holds the message while claim B is still sending: B's recipient keeps
    # its lease, so B's result is recorded, not dropped (and sent again on approval).
    store = Store(store_url)
    now = datetime.now(UTC)
    new = queued("m1", "a@a.example", "b@b.example")
    try:
        await upgrade(store)
        await store.run(lambda session: repo.add_messages(session, [(new, now)]))
        claims = await _claim(store, "gw", now)
        by_domain = {c.domain: c for c in claims}
        a, b = by_domain["a.example"], by_domain["b.example"]
        async with store.transaction(durable=False) as session:
            held = await repo.hold_message(
                session,
                "m1",
                "protection-failed",
                now,
                ours=[r.id for r in a.recipients],
                owner="gw",
            )
        assert held
        sent = [OutcomeRow(b.recipients[0].id, RecipientState.DELIVERED, 250, "2.0.0 ok")]
        kept = await store.run(
            partial(repo.record_outcomes, outcomes=sent, owner="gw", now=now), durable=False
        )
        async with store.read() as session:
            states = dict((await session.execute(select(Recipient.address, Recipient.state))).all())
    finally:
        await store.close()
    assert kept == {b.recipients[0].id}
    assert states == {"a@a.example": "waiting", "b@b.example": "delivered"}


def slow_commits(monkeypatch: pytest.MonkeyPatch, seconds: float) -> threading.Event:
    """The store takes `seconds` over each accepting commit; set as one begins."""
    started = threading.Event()
    original = repo.add_messages

    def slow_add(session: Any, batch: Any, lease: Any = None) -> Any:
        started.set()
        time.sleep(seconds)
        return original(session, batch, lease)

    monkeypatch.setattr(repo, "add_messages", slow_add)
    return started


async def test_closing_the_committer_lets_a_commit_in_progress_finish_and_refuses_new_ones(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.committer import Closed, GroupCommitter

    store = Store(sqlite_url)
    now = datetime.now(UTC)

    def message(mid: str) -> NewMessage:
        return queued(mid, "b@x.example", sender="a@example.com")

    try:
        await upgrade(store)
        started = slow_commits(monkeypatch, 0.3)  # the close arrives mid-commit
        committer = GroupCommitter(store)
        first = asyncio.create_task(committer.commit(message("m1"), now))
        await asyncio.to_thread(started.wait, 5)
        await committer.close()
        await asyncio.wait_for(first, 5)  # its client hears 250: the commit was not cut off
        with pytest.raises(Closed):
            await committer.commit(message("m2"), now)
        async with store.read() as session:
            assert (await session.scalars(select(Message.id))).all() == ["m1"]
    finally:
        await store.close()


async def test_a_commit_still_running_when_the_grace_ends_answers_its_client(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cut off after the grace, the batch's submitters hear Closed (451), never nothing."""
    from gateway.committer import Closed, GroupCommitter

    store = Store(sqlite_url)
    now = datetime.now(UTC)
    try:
        await upgrade(store)
        started = slow_commits(monkeypatch, 1.0)  # longer than the grace below
        committer = GroupCommitter(store)
        first = asyncio.create_task(
            committer.commit(
                queued("m1", "b@x.example", sender="a@example.com"),
                now,
            )
        )
        await asyncio.to_thread(started.wait, 5)
        await committer.close(grace=0.1)
        with pytest.raises(Closed, match="while the message was being stored"):
            await asyncio.wait_for(first, 5)
    finally:
        await store.close()


async def test_a_second_claim_failing_on_a_held_message_puts_its_recipients_to_wait_too(
    store_url: str,
) -> None:
    # Both domains' claims fail protection: the first holds the message, the second
    # finds it held. Its recipient must wait for the decision like the others, not stay
    # due under a lease that runs out (nothing would ever send or end it).
    store = Store(store_url)
    now = datetime.now(UTC)
    new = queued("m1", "a@a.example", "b@b.example")
    try:
        await upgrade(store)
        await store.run(lambda session: repo.add_messages(session, [(new, now)]))
        claims = await _claim(store, "gw", now)
        held = []
        for claim in claims:
            async with store.transaction(durable=False) as session:
                held.append(
                    await repo.hold_message(
                        session,
                        "m1",
                        "protection-failed",
                        now,
                        ours=[r.id for r in claim.recipients],
                        owner="gw",
                    )
                )
        async with store.read() as session:
            rows = (await session.execute(select(Recipient.state, Recipient.lease_owner))).all()
    finally:
        await store.close()
    assert held == [True, False]
    assert [tuple(r) for r in rows] == [("waiting", None), ("waiting", None)]


async def test_a_hold_leaves_recipients_whose_lease_another_worker_took_to_that_worker(
    store_url: str,
) -> None:
    # w1's lease ran out while its protection step ran; w2 claimed the recipient and is
    # sending. w1 then fails protection and holds the message: w2's lease stands, so
    # w2's result is recorded instead of dropped (and the mail sent again on approval).
    store = Store(store_url)
    now = datetime.now(UTC)
    new = queued("m1", "a@a.example")
    try:
        await upgrade(store)
        await store.run(lambda session: repo.add_messages(session, [(new, now)]))
        (first,) = await _claim(store, "w1", now, timedelta(seconds=1))
        later = now + timedelta(seconds=2)
        (second,) = await _claim(store, "w2", later)
        async with store.transaction(durable=False) as session:
            held = await repo.hold_message(
                session,
                "m1",
                "protection-failed",
                later,
                ours=[r.id for r in first.recipients],
                owner="w1",
            )
        sent = [OutcomeRow(second.recipients[0].id, RecipientState.DELIVERED, 250, "2.0.0 ok")]
        kept = await store.run(
            partial(repo.record_outcomes, outcomes=sent, owner="w2", now=later), durable=False
        )
        async with store.read() as session:
            state = await session.scalar(select(Recipient.state))
    finally:
        await store.close()
    assert held
    assert kept == {second.recipients[0].id}
    assert state == RecipientState.DELIVERED


async def test_a_hold_naming_its_recipients_must_name_their_lease_owner(store_url: str) -> None:
    store = Store(store_url)
    now = datetime.now(UTC)
    try:
        await upgrade(store)
        await store.run(
            lambda session: repo.add_messages(session, [(queued("m1", "a@a.example"), now)])
        )
        (claim,) = await _claim(store, "gw", now)
        with pytest.raises(ValueError, match="owner"):
            async with store.transaction(durable=False) as session:
                await repo.hold_message(
                    session, "m1", "protection-failed", now, ours=[r.id for r in claim.recipients]
                )
        async with store.read() as session:
            state = await session.scalar(select(Message.state))
    finally:
        await store.close()
    assert state == MessageState.QUEUED  # nothing half done


async def test_a_leased_message_after_an_unleased_one_in_a_commit_is_leased(
    store_url: str,
) -> None:
    # One statement inserts every recipient of a group commit, and takes its columns
    # from the first row: a lease set only on later rows was dropped without a word,
    # its claim still handed to delivery, and the message sent again.
    held = NewMessage(
        id="held",
        mail_from="alice@example.com",
        rcpt_tos=["h@client.example"],
        raw=MESSAGE,
        state=MessageState.HELD,
        verdict={},
    )
    now = datetime.now(UTC)
    lease = repo.Lease("gw", now + timedelta(minutes=5), {"leased"})
    store = Store(store_url)
    try:
        await upgrade(store)
        claims = await store.run(
            lambda session: repo.add_messages(
                session, [(held, now), (queued("leased", "q@client.example"), now)], lease
            )
        )
        async with store.read() as session:
            rows = (await session.execute(select(Recipient.address, Recipient.lease_owner))).all()
    finally:
        await store.close()
    assert [c.message_id for c in claims] == ["leased"]
    assert sorted(rows) == [("h@client.example", None), ("q@client.example", "gw")]
