"""Nothing waits forever unnoticed: the deciders of held mail are reminded every
`remind_after`, and the `escalate_to` groups are told once after `escalate_after`.
Driven by an injected clock; the reminders are mailed through the delivery queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.approvals import Nudge, remind_holds
from gateway.config import Config
from quarantine import approvals as qa
from quarantine.db import Store
from tests.api_support import HOLD_FOR_COMPLIANCE, Clock, audit_events, message, person, send
from tests.conftest import Received, Upstream, gateway_config, running

REMINDER = "Reminder: mail waiting for your approval"
ESCALATED = "Escalated: mail waiting for approval"


def _config(tmp_path: Path, url: str, port: int, **approval: Any) -> Config:
    return gateway_config(
        tmp_path,
        url,
        port,
        rules=[HOLD_FOR_COMPLIANCE],  # type: ignore[arg-type]
        admin={"listen": "127.0.0.1:0", "public_url": "https://sekisho.example.com"},
        approval=approval,
    )


def _subject(received: Received) -> str:
    return str(message_from_bytes(received.data, policy=policy.default)["Subject"])


def _mails(upstream: Upstream, subject: str) -> list[Received]:
    return [r for r in upstream.received if subject in _subject(r)]


async def _settle(done: Callable[[], bool] | None = None) -> None:
    """Wait until `done()`, then a little longer, so that a mail that should not come
    (delivery polls every 50 ms in these tests) has had its chance to arrive."""
    for _ in range(200 if done else 0):
        if done is not None and done():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)


async def _remind(gw: Gateway, clock: Clock) -> list[Nudge]:
    return await remind_holds(gw.store, clock(), gw.config.approval, gw.notices, audit=gw.audit)


async def _staff(gw: Gateway) -> None:
    await person(gw, "boss", "approver", emails=["boss@example.com"], groups=["compliance"])
    await person(gw, "mgr", "approver", emails=["mgr@example.com"], groups=["managers"])
    await gw.credentials.refresh()


async def test_deciders_are_reminded_after_remind_after_and_not_twice_within_it(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    clock = Clock()
    config = _config(tmp_path, store_url, upstream.port, remind_after="1h")
    async with running(config, clock=clock) as gw:
        await _staff(gw)
        held = await send(gw, message())
        clock.advance(timedelta(minutes=59))
        early = await _remind(gw, clock)
        clock.advance(timedelta(minutes=2))
        first = await _remind(gw, clock)
        await _settle(lambda: len(_mails(upstream, REMINDER)) >= 1)
        clock.advance(timedelta(minutes=30))
        within = await _remind(gw, clock)
        async with gw.store.transaction() as session:  # another instance's stale list
            stale = await qa.claim_reminder(session, held, clock(), clock() - timedelta(hours=1))
        await _settle()
        after_first = _mails(upstream, REMINDER)
        clock.advance(timedelta(minutes=31))
        second = await _remind(gw, clock)
        await _settle(lambda: len(_mails(upstream, REMINDER)) >= 2)
        reminded = audit_events(gw, "message.reminded")
    assert early == []
    assert first == [Nudge(held, "reminder")]
    assert within == [] and stale is None
    assert second == [Nudge(held, "reminder")]
    assert [r.rcpt_tos for r in after_first] == [["boss@example.com"]]
    assert len(_mails(upstream, REMINDER)) == 2
    body = message_from_bytes(after_first[0].data, policy=policy.default).get_body()
    assert body is not None and held in body.get_content()
    assert f"https://sekisho.example.com/api/v1/messages/{held}" in body.get_content()
    assert not [r for r in upstream.received if "mgr@example.com" in r.rcpt_tos]  # no escalation
    assert [e["id"] for e in reminded] == [held, held]


async def test_a_reminder_is_not_repeated_after_a_restart_within_the_interval(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    clock = Clock()
    config = _config(tmp_path, sqlite_url, upstream.port, remind_after="1h")
    async with running(config, clock=clock) as gw:
        await _staff(gw)
        held = await send(gw, message())
        clock.advance(timedelta(minutes=61))
        before_restart = await _remind(gw, clock)
    clock.advance(timedelta(minutes=10))
    async with running(config, clock=clock) as gw:
        after_restart = await _remind(gw, clock)
        clock.advance(timedelta(minutes=55))
        next_interval = await _remind(gw, clock)
    assert before_restart == [Nudge(held, "reminder")]
    assert after_restart == []
    assert next_interval == [Nudge(held, "reminder")]


async def test_escalation_mails_the_escalate_to_members_once(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    clock = Clock()
    config = _config(
        tmp_path,
        store_url,
        upstream.port,
        remind_after=None,
        escalate_after="2h",
        escalate_to=["group:managers"],
    )
    async with running(config, clock=clock) as gw:
        await _staff(gw)
        held = await send(gw, message())
        clock.advance(timedelta(minutes=119))
        early = await _remind(gw, clock)
        clock.advance(timedelta(minutes=2))
        escalated = await _remind(gw, clock)
        await _settle(lambda: bool(_mails(upstream, ESCALATED)))
        clock.advance(timedelta(days=1))
        later = await _remind(gw, clock)
        await _settle()
        events = audit_events(gw, "message.escalated")
    assert early == []
    assert escalated == [Nudge(held, "escalation")]
    assert later == []
    assert [r.rcpt_tos for r in _mails(upstream, ESCALATED)] == [["mgr@example.com"]]
    assert _mails(upstream, REMINDER) == []  # remind_after is off
    assert [e["id"] for e in events] == [held]


async def test_two_instances_reminding_at_once_send_one_reminder(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    if store_url.startswith("sqlite"):
        pytest.skip("several instances share one PostgreSQL (DESIGN.md, Scale)")
    clock = Clock()
    config = _config(tmp_path, store_url, upstream.port, remind_after="1h")
    async with running(config, clock=clock) as gw:
        await _staff(gw)
        held = await send(gw, message())
        clock.advance(timedelta(minutes=61))
        other = Store(config.store.url)  # a second instance's own connections
        try:
            results = await asyncio.gather(
                remind_holds(gw.store, clock(), config.approval, None),
                remind_holds(other, clock(), config.approval, None),
                remind_holds(other, clock(), config.approval, None),
            )
        finally:
            await other.close()
    assert [n for r in results for n in r] == [Nudge(held, "reminder")]
