"""How delivery gets its work. A message accepted while a worker is free is leased to
it in the accepting commit and sent with no claiming transaction at all. Otherwise
delivery claims: at once when a message is queued, again at once only while there
may be more than one claim takes, and else at the next poll. Every test here polls
once a minute, so anything that arrives in seconds did not wait for a poll."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gateway.app import Gateway
from gateway.delivery import Delivery
from quarantine import repository as repo
from quarantine.models import Message, Recipient
from quarantine.states import MessageState, RecipientState
from tests.conftest import Upstream, gateway_config, queued, running, submit


def counted_claims(monkeypatch: pytest.MonkeyPatch, after: Any = None) -> list[int]:
    """Count `claim_due` calls (each one a turn of the store's writer), and the claims
    each one returned; `after(session, claims)` runs inside the claim's transaction."""
    calls: list[int] = []
    original = repo.claim_due

    def claim_due(session: Any, **kwargs: Any) -> list[repo.Claim]:
        claims = original(session, **kwargs)
        calls.append(len(claims))
        if after is not None:
            after(session, claims)
        return claims

    monkeypatch.setattr(repo, "claim_due", claim_due)
    return calls


async def delivered(gw: Gateway, count: int) -> None:
    async def poll() -> None:
        while True:
            async with gw.store.read() as session:
                states = (await session.scalars(select(Message.state))).all()
            if states.count(MessageState.DELIVERED) >= count:
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), 5)


def no_handoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivery never has a worker to spare for intake: every message is claimed."""
    monkeypatch.setattr(Delivery, "reserve", lambda self, transactions: 0)


async def test_a_message_accepted_while_a_worker_is_free_needs_no_claim(
    tmp_path: Path, store_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counted_claims(monkeypatch)
    config = gateway_config(tmp_path, store_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        await asyncio.sleep(0.2)  # the first round at start finds nothing
        before = len(calls)
        for n in range(3):
            await submit(gw, [f"r{n}@client.example", f"s{n}@other.example"])
            await upstream.wait_for(2 * (n + 1), timeout=5)
            await delivered(gw, n + 1)  # idle again: recorded, nothing in flight
        await asyncio.sleep(0.2)
        async with gw.store.read() as session:
            rows = (await session.execute(select(Recipient.state, Recipient.lease_owner))).all()
            messages = (await session.scalars(select(Message.state))).all()
    assert calls[before:] == []
    # two domains, two transactions each; every one recorded, its lease given up
    assert len(upstream.received) == 6
    assert set(rows) == {(RecipientState.DELIVERED, None)}
    assert messages == [MessageState.DELIVERED] * 3
    lines = [json.loads(line) for line in Path(config.audit.path).read_text().splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("delivery.sent") == 6 and events.count("message.delivered") == 3
    for accepted in (n for n, line in enumerate(lines) if line["event"] == "message.accepted"):
        first = next(n for n, line in enumerate(lines) if line.get("id") == lines[accepted]["id"])
        assert first == accepted  # nothing of a message is audited before its acceptance


async def test_a_handed_over_send_holds_its_lease_while_it_runs(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    upstream.delay = 0.5
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        # the first round at start finds nothing; a commit during it is left to the next
        # round, which need not have claimed by the time this reads
        await asyncio.sleep(0.2)
        await submit(gw, ["r@client.example"])
        async with gw.store.read() as session:
            owner, until = (
                await session.execute(select(Recipient.lease_owner, Recipient.lease_expires_at))
            ).one()
        await upstream.wait_for(1, timeout=5)
    assert owner == gw.instance
    assert until is not None and until > datetime.now(UTC) + timedelta(minutes=4)


@pytest.mark.parametrize(("workers", "claimed"), [(1, 2), (4, 1)])
async def test_while_delivery_is_busy_new_mail_waits_for_its_next_claim(
    tmp_path: Path,
    sqlite_url: str,
    upstream: Upstream,
    monkeypatch: pytest.MonkeyPatch,
    workers: int,
    claimed: int,
) -> None:
    # One send on the wire still leaves delivery nearly idle: with a free worker (of
    # four) the next message is handed over, as one client sending message after
    # message needs. Two on the wire is busy: the third is claimed, in a batch with
    # whatever else came, rather than one send (and one recording) per commit. With
    # one worker there is no room at all: everything after the first is claimed.
    calls = counted_claims(monkeypatch)
    upstream.delay = 0.3
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        delivery={"poll_interval": "60s", "workers": workers, "connections": workers},
    )
    async with running(config) as gw:
        await asyncio.sleep(0.2)
        before = len(calls)
        for rcpt in ("a", "b", "c"):
            await submit(gw, [f"{rcpt}@client.example"])
        received = await upstream.wait_for(3, timeout=5)
    assert sorted(r.rcpt_tos[0] for r in received) == [
        "a@client.example",
        "b@client.example",
        "c@client.example",
    ]
    assert sum(calls[before:]) == claimed


async def test_a_send_waiting_only_for_its_recording_does_not_make_delivery_busy(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last message's send is done with the network and waits for its outcome to
    # be recorded (here held back on purpose; in a busy store, behind the next
    # message's commit, which goes first): the next message is still handed over.
    # Counting it as busy made every other message of one client's stream cost a claim.
    calls = counted_claims(monkeypatch)
    original = Delivery._commit_outcomes

    async def slow_recording(self: Delivery, batch: Any) -> None:
        await asyncio.sleep(0.3)
        await original(self, batch)

    monkeypatch.setattr(Delivery, "_commit_outcomes", slow_recording)
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        await asyncio.sleep(0.2)
        before = len(calls)
        for n in range(3):
            await submit(gw, [f"r{n}@client.example"])
            await upstream.wait_for(n + 1, timeout=5)  # sent; its recording still waits
        await delivered(gw, 3)
    assert calls[before:] == []


async def test_claims_lost_after_the_commit_are_claimed_when_their_lease_runs_out(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Delivery.hand_over

    def lose_them(self: Delivery, claims: Any, reserved: int) -> None:
        original(self, (), reserved)
        if claims:
            raise RuntimeError("injected: the claims never reach a worker")

    monkeypatch.setattr(Delivery, "hand_over", lose_them)
    config = gateway_config(
        tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "100ms", "lease": "1s"}
    )
    async with running(config) as gw:
        await submit(gw, ["r@client.example"])
        await asyncio.sleep(0.5)
        assert upstream.received == []  # leased to nobody working on it: not yet
        received = await upstream.wait_for(1, timeout=5)
    assert received[0].rcpt_tos == ["r@client.example"]


async def test_one_message_at_a_time_costs_one_claim_each(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_handoff(monkeypatch)
    calls = counted_claims(monkeypatch)
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        await asyncio.sleep(0.2)  # the first round at start finds nothing
        before = len(calls)
        for n in range(5):
            await submit(gw, [f"r{n}@client.example"])
            await upstream.wait_for(n + 1, timeout=5)
        await asyncio.sleep(0.2)  # a claim after the last send would show here
    # Each message is claimed by the round its queuing woke; a claim that took less
    # than it could is not followed by another that would find nothing.
    assert calls[before:] == [1, 1, 1, 1, 1]


async def test_a_message_queued_while_a_claim_runs_is_claimed_at_once(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wake arrives after the claim looked and found nothing, before the round ends:
    # it must not be lost, or the message would wait for the next poll (here a minute).
    no_handoff(monkeypatch)
    gateways: list[Gateway] = []
    loop = asyncio.get_running_loop()

    def queue_one_behind_its_back(session: Any, claims: list[repo.Claim]) -> None:
        if claims or not gateways or session.get(Message, "late") is not None:
            return
        repo.add_messages(session, [(queued("late", "late@client.example"), datetime.now(UTC))])
        delivery = gateways[0].delivery
        assert delivery is not None
        loop.call_soon_threadsafe(delivery.wake)

    counted_claims(monkeypatch, after=queue_one_behind_its_back)
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        gateways.append(gw)
        assert gw.delivery is not None
        gw.delivery.wake()  # a round now, with the gateway fully started
        received = await upstream.wait_for(1, timeout=5)
    assert received[0].rcpt_tos == ["late@client.example"]


async def test_more_recipients_than_one_claim_takes_are_sent_without_waiting_for_a_poll(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_handoff(monkeypatch)
    calls = counted_claims(monkeypatch)
    # 2 workers read at most 20 recipients a claim: one message to 45 at one domain
    # fills a claim with one transaction, and the rest must follow at once.
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        delivery={"poll_interval": "60s", "workers": 2, "connections": 2},
    )
    rcpts = [f"r{n}@client.example" for n in range(45)]
    async with running(config) as gw:
        await submit(gw, rcpts)
        received = await upstream.wait_for(45, timeout=5)
    assert sorted(a for r in received for a in r.rcpt_tos) == sorted(rcpts)
    assert max(calls) == 1 and len(received) >= 3  # 20 + 20 + 5 (or less at a time)


async def test_a_committer_fault_answers_each_client_and_the_next_commit_works(
    sqlite_url: str,
) -> None:
    from gateway.committer import GroupCommitter
    from quarantine.db import Store
    from quarantine.migrate import upgrade

    class Faulty:
        owner = "gw"
        faults = 1

        def reserve(self, transactions: int) -> int:
            if self.faults:
                self.faults -= 1
                raise RuntimeError("injected")
            return 0

        def lease_until(self) -> datetime:
            return datetime.now(UTC)

        def hand_over(self, claims: Any, reserved: int) -> None:
            pass

        def ride(self) -> None:
            return None

    store = Store(sqlite_url)
    try:
        await upgrade(store)
        committer = GroupCommitter(store, handoff=Faulty())
        with pytest.raises(RuntimeError, match="injected"):
            await asyncio.wait_for(
                committer.commit(queued("m1", "b@client.example"), datetime.now(UTC)), 5
            )
        handed = await asyncio.wait_for(
            committer.commit(queued("m2", "b@client.example"), datetime.now(UTC)), 5
        )
        await committer.close()
        async with store.read() as session:
            stored = (await session.scalars(select(Message.id))).all()
    finally:
        await store.close()
    assert handed is False and stored == ["m2"]


async def test_mail_accepted_during_a_claiming_round_is_handed_over_without_a_round(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A round's claim is running when intake commits. Were the commit left to the next
    # round, the next message would meet that round, and so on: one client's mail
    # would each be claimed alone.
    gateways: list[Gateway] = []
    loop = asyncio.get_running_loop()
    sending: list[Any] = []

    def accept_one_meanwhile(session: Any, claims: list[repo.Claim]) -> None:
        if claims or not gateways or sending:
            return
        sending.append(asyncio.run_coroutine_threadsafe(submit(gateways[0], ["m@x.example"]), loop))
        time.sleep(0.3)  # intake inspects and reaches its commit while this round runs

    calls = counted_claims(monkeypatch, after=accept_one_meanwhile)
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        await asyncio.sleep(0.2)
        before = len(calls)
        gateways.append(gw)
        assert gw.delivery is not None
        gw.delivery.wake()
        received = await upstream.wait_for(1, timeout=5)
        await asyncio.wrap_future(sending[0])
    assert received[0].rcpt_tos == ["m@x.example"]
    assert calls[before:] == [0]  # only the round that was running: none claimed it
