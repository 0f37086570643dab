"""`first_time_recipient_domain` reads a table of domains delivered to: one row per
domain, written by delivery in the transaction that records the send, known to this
instance at once and to a restarted one from the store; 0007 backfills it."""

from __future__ import annotations

import asyncio
import smtplib
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert, select

from quarantine.db import Store
from quarantine.migrate import upgrade
from quarantine.models import Body, KnownDomain, Message, Recipient
from quarantine.repository import NewMessage
from quarantine.states import MessageState
from tests.conftest import Upstream, gateway_config, running

FIRST_TIME = [
    {"name": "first-time", "when": {"first_time_recipient_domain": True}, "action": "hold"}
]
MESSAGE = b"From: alice@example.com\r\nSubject: hi\r\n\r\nhello\r\n"


def _send(port: int, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("alice@example.com", [rcpt], MESSAGE)


async def _state(store: Store, rcpt: str) -> str:
    async with store.read() as session:
        return str(
            await session.scalar(
                select(Message.state)
                .join(Recipient, Recipient.message_id == Message.id)
                .where(Recipient.address == rcpt)
                .order_by(Message.id.desc())
                .limit(1)
            )
        )


async def _delivered(store: Store, rcpt: str) -> None:
    for _ in range(200):
        if await _state(store, rcpt) == "delivered":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{rcpt}: {await _state(store, rcpt)}")


async def test_a_domain_is_known_once_delivered_to_and_after_a_restart(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, store_url, upstream.port)
    config_with_rule = gateway_config(tmp_path, store_url, upstream.port, rules=FIRST_TIME)
    # first: no rule, deliver to new.example
    async with running(config) as gw:
        await asyncio.to_thread(_send, gw.smtp_port, "a@New.Example")
        await _delivered(gw.store, "a@New.Example")
        assert "new.example" in gw.known_domains.current()
        async with gw.store.read() as session:
            assert (await session.scalars(select(KnownDomain.domain))).all() == ["new.example"]
    # a restarted gateway with the rule: new.example is known, other.example is not
    async with running(config_with_rule) as gw:
        await asyncio.to_thread(_send, gw.smtp_port, "b@new.example")
        await asyncio.to_thread(_send, gw.smtp_port, "c@other.example")
        await _delivered(gw.store, "b@new.example")
        assert await _state(gw.store, "c@other.example") == "held"


async def test_migration_0007_backfills_the_domains_already_delivered_to(store_url: str) -> None:
    store = Store(store_url)
    now = datetime.now(UTC)
    try:
        await upgrade(store, "0006")
        async with store.transaction() as session:
            for i, (domain, state) in enumerate(
                [
                    ("Old.Example", "delivered"),
                    ("old.example", "delivered"),
                    ("bounced.example", "bounced"),
                    ("waiting.example", "queued"),
                ]
            ):
                await session.execute(
                    insert(Message).values(
                        id=f"m{i}",
                        created_at=now,
                        updated_at=now,
                        state="delivered",
                        kind="message",
                        mail_from="a@example.com",
                        size=1,
                        verdict={},
                        attachments=[],
                    )
                )
                await session.execute(insert(Body).values(message_id=f"m{i}", raw=b"x"))
                await session.execute(
                    insert(Recipient).values(
                        message_id=f"m{i}",
                        address=f"x@{domain}",
                        domain=domain,
                        state=state,
                        attempts=1,
                        updated_at=now,
                        finished_at=now,
                    )
                )
        await upgrade(store)
        async with store.read() as session:
            known = (await session.scalars(select(KnownDomain.domain))).all()
        assert known == ["old.example"]
    finally:
        await store.close()


def test_known_domains_are_kept_in_the_form_the_rules_compare() -> None:
    """A recipient written `x@Example.COM.` (trailing dot: the root) is example.com for
    the rules; stored or watched in another form it would be a first-time domain on
    every message."""
    from gateway.known_domains import KnownDomains
    from policies.clients import domain_of as rules_form
    from quarantine import repository as repo

    address = " x@Example.COM. "
    rows = repo._recipient_rows(
        NewMessage(
            id="m1",
            mail_from="a@example.com",
            rcpt_tos=[address],
            raw=MESSAGE,
            state=MessageState.QUEUED,
            verdict={},
        ),
        datetime.now(UTC),
    )
    known = KnownDomains(store=None)  # type: ignore[arg-type]
    known.observe({"event": "delivery.sent", "rcpt": address})
    assert rows[0]["domain"] == rules_form(address) == "example.com"
    assert known.current() == {"example.com"}
