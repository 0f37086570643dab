"""When delivery looks for work: at once when a message is queued, again at once only
while there may be more than one claim takes, and otherwise at the next poll. Every
test here polls once a minute, so anything that arrives in seconds was claimed because
it was woken, not because a poll came round."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from gateway.app import Gateway
from quarantine import repository as repo
from quarantine.models import Message
from quarantine.repository import NewMessage
from quarantine.states import MessageState
from tests.conftest import Upstream, gateway_config, running

MESSAGE = b"From: alice@example.com\r\nTo: bob@client.example\r\nSubject: hi\r\n\r\nhello\r\n"


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


async def send(gw: Gateway, rcpts: list[str]) -> None:
    await aiosmtplib.send(
        MESSAGE,
        sender="alice@example.com",
        recipients=rcpts,
        hostname="127.0.0.1",
        port=gw.smtp_port,
        start_tls=False,
    )


async def test_one_message_at_a_time_costs_one_claim_each(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = counted_claims(monkeypatch)
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"poll_interval": "60s"})
    async with running(config) as gw:
        await asyncio.sleep(0.2)  # the first round at start finds nothing
        before = len(calls)
        for n in range(5):
            await send(gw, [f"r{n}@client.example"])
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
    gateways: list[Gateway] = []
    loop = asyncio.get_running_loop()

    def queue_one_behind_its_back(session: Any, claims: list[repo.Claim]) -> None:
        if claims or not gateways or session.get(Message, "late") is not None:
            return
        new = NewMessage(
            id="late",
            mail_from="alice@example.com",
            rcpt_tos=["late@client.example"],
            raw=MESSAGE,
            state=MessageState.QUEUED,
            verdict={},
        )
        repo.add_messages(session, [(new, datetime.now(UTC))])
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
        await send(gw, rcpts)
        received = await upstream.wait_for(45, timeout=5)
    assert sorted(a for r in received for a in r.rcpt_tos) == sorted(rcpts)
    assert max(calls) == 1 and len(received) >= 3  # 20 + 20 + 5 (or less at a time)
