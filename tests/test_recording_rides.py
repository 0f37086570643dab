"""On SQLite, a send's outcome rides with intake's next commit: while mail arrives,
recording a send costs no transaction of its own, and never makes the next message's
commit wait behind it. Whatever goes wrong with the ride, the outcome is still
recorded, once, by delivery's own recorder, and the new message is stored as if it
had never carried anything, or, if the ride took the transaction down with it, not
at all and answered 451. PostgreSQL has no single writer: outcomes never wait there."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from sqlalchemy import select

from gateway import delivery as delivery_module
from gateway.app import Gateway
from gateway.delivery import Delivery, Ride
from quarantine.models import Message
from quarantine.repository import Claim
from quarantine.states import MessageState
from tests.conftest import Upstream, gateway_config, running, submit


@pytest.fixture
def alone(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Outcomes wait for a ride for up to a second (intake counts as active for 5 s),
    so a ride is not a race with the test; returns the message ids of each recording
    delivery made in a transaction of its own."""
    monkeypatch.setattr(delivery_module, "RIDE_WAIT", 1.0)
    monkeypatch.setattr(delivery_module, "INTAKE_ACTIVE", 5.0)
    batches: list[list[str]] = []
    original = Delivery._commit_outcomes

    async def commit_outcomes(self: Delivery, batch: Sequence[Any]) -> None:
        batches.append([item.claim.message_id for item in batch])
        await original(self, batch)

    monkeypatch.setattr(Delivery, "_commit_outcomes", commit_outcomes)
    return batches


async def states(gw: Gateway) -> list[tuple[str, MessageState]]:
    async with gw.store.read() as session:
        rows = await session.execute(select(Message.id, Message.state).order_by(Message.created_at))
        return [(mid, state) for mid, state in rows.all()]


async def until_delivered(gw: Gateway, count: int) -> list[tuple[str, MessageState]]:
    async def poll() -> list[tuple[str, MessageState]]:
        while True:
            rows = await states(gw)
            if [s for _, s in rows].count(MessageState.DELIVERED) >= count:
                return rows
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), 5)


async def first_sent(gw: Gateway, upstream: Upstream) -> str:
    """Send one message; return its id once its outcome waits to be recorded."""
    await asyncio.sleep(0.2)  # the first round at start finds nothing
    await submit(gw, ["a@client.example"])
    await upstream.wait_for(1, timeout=5)
    await asyncio.sleep(0.1)  # sent; on SQLite its outcome now waits for a ride
    ((first, _),) = await states(gw)
    return first


def audited(gw: Gateway, event: str) -> list[str]:
    lines = Path(gw.config.audit.path).read_text().splitlines()
    return [e["id"] for e in map(json.loads, lines) if e["event"] == event]


async def test_an_outcome_is_recorded_by_the_next_message_s_commit(
    tmp_path: Path, store_url: str, upstream: Upstream, alone: list[list[str]]
) -> None:
    sqlite = store_url.startswith("sqlite")
    config = gateway_config(tmp_path, store_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        first = await first_sent(gw, upstream)
        waiting = dict(await states(gw))[first]
        await submit(gw, ["b@client.example"])
        # the 250 of the second message came after the commit that recorded the first
        carried = dict(await states(gw))
        ridden = list(alone)
        rows = await until_delivered(gw, 2)  # the second: by itself, after its wait
        sent = audited(gw, "delivery.sent")
    second = next(mid for mid, _ in rows if mid != first)
    assert sent == [first, second]
    if not sqlite:  # each recorded by itself, at once
        assert ridden[:1] == [[first]] and alone == [[first], [second]]
        return
    assert waiting is MessageState.QUEUED
    assert carried == {first: MessageState.DELIVERED, second: MessageState.QUEUED}
    assert ridden == []
    assert alone == [[second]]


async def test_an_outcome_that_fails_in_the_ride_is_rolled_back_and_recorded_alone(
    tmp_path: Path,
    sqlite_url: str,
    upstream: Upstream,
    alone: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first recording writes its rows, then fails: in the ride's savepoint, so the
    # message carrying it still commits and those rows are undone. Delivery records
    # the outcome again by itself, at once, although mail keeps coming (a ride that
    # failed once would fail again, and hold up every outcome behind it), and finds
    # the recipient still due: had the rows stayed, that second recording would find
    # it already delivered and audit nothing.
    original = Delivery._apply
    faults = [RuntimeError("injected")]

    def apply(self: Delivery, session: Any, batch: Any, now: Any) -> Any:
        events = original(self, session, batch, now)
        if faults:
            raise faults.pop()
        return events

    monkeypatch.setattr(Delivery, "_apply", apply)
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        first = await first_sent(gw, upstream)
        await submit(gw, ["b@client.example"])
        carried = dict(await states(gw))
        await submit(gw, ["c@client.example"])  # a commit the outcome could ride again
        rows = await until_delivered(gw, 3)
        sent = audited(gw, "delivery.sent")
    assert faults == []
    assert len(carried) == 2  # the second message committed all the same
    assert [first] in alone
    assert sorted(sent) == sorted(mid for mid, _ in rows)  # once each


async def test_an_outcome_whose_carrying_commit_fails_is_recorded_alone(
    tmp_path: Path,
    sqlite_url: str,
    upstream: Upstream,
    alone: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Recorded in the ride, then the transaction fails: nothing of it was committed,
    # so nothing of it is audited, and delivery records it again by itself.
    original = Ride.apply
    fail = [False]

    def apply(self: Ride, session: Any) -> None:
        original(self, session)
        if fail[0]:
            fail[0] = False
            raise RuntimeError("injected")

    monkeypatch.setattr(Ride, "apply", apply)
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        first = await first_sent(gw, upstream)
        fail[0] = True
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await submit(gw, ["b@client.example"])
        rows = await until_delivered(gw, 1)
        sent = audited(gw, "delivery.sent")
    assert fail == [False]
    assert refused.value.code == 451
    assert rows == [(first, MessageState.DELIVERED)]
    assert alone == [[first]]
    assert sent == [first]
    assert audited(gw, "message.delivered") == [first]


async def test_a_ride_that_loses_the_transaction_fails_the_commit(
    tmp_path: Path,
    sqlite_url: str,
    upstream: Upstream,
    alone: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A full disk or an I/O error makes SQLite roll back the whole transaction, the
    # savepoint with it: swallowing the error there would commit nothing and still
    # answer 250 for the message. Here SQLite's rollback is done by hand.
    original = Delivery._apply
    faults = [RuntimeError("injected: database or disk is full")]

    def apply(self: Delivery, session: Any, batch: Any, now: Any) -> Any:
        if faults:
            session.connection().exec_driver_sql("ROLLBACK")
            raise faults.pop()
        return original(self, session, batch, now)

    monkeypatch.setattr(Delivery, "_apply", apply)
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        first = await first_sent(gw, upstream)
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await submit(gw, ["b@client.example"])
        stored = await until_delivered(gw, 1)
        await submit(gw, ["b@client.example"])  # the client tries again
        rows = await until_delivered(gw, 2)
    assert faults == []
    assert refused.value.code == 451
    assert stored == [(first, MessageState.DELIVERED)]
    assert len(rows) == 2 and [first] in alone


async def test_outcomes_given_back_while_the_recorder_waits_for_a_ride_are_recorded(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, alone: list[list[str]]
) -> None:
    # A ride gives its outcomes back while the recorder waits for the next ride (with
    # the recorder alive, none other is started for them); that next ride then takes
    # what the recorder waited for. The recorder must not stop there: the outcomes
    # given back would wait for the next send's recording, and their workers with them.
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        delivery = gw.delivery
        assert delivery is not None
        loop = asyncio.get_running_loop()

        def claim(message_id: str) -> Claim:
            return Claim(message_id, "a@example.com", "message", datetime.now(UTC), {}, "x", ())

        delivery.hand_over((), 0)  # intake is committing
        given_back = loop.create_task(delivery._record(claim("given-back"), []))
        await asyncio.sleep(0.01)
        first = delivery.ride()
        assert first is not None
        await asyncio.sleep(0.01)
        waited_for = loop.create_task(delivery._record(claim("waited-for"), []))
        await asyncio.sleep(0.01)  # the recorder waits for a ride
        first.settle(committed=False)
        second = delivery.ride()
        assert second is not None
        await asyncio.wait_for(given_back, 5)
        second.settle(committed=False)
        await asyncio.wait_for(waited_for, 5)
    assert alone == [["given-back"], ["waited-for"]]
