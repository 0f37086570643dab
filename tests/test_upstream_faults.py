"""What the upstream says decides each recipient: 2xx delivered, 4xx retried, 5xx bounced."""

from __future__ import annotations

import asyncio
import email
import functools
from datetime import UTC, datetime, timedelta
from email import policy
from pathlib import Path

import aiosmtplib
from sqlalchemy import select

from quarantine import repository as repo
from quarantine.models import Recipient
from tests.conftest import Upstream, gateway_config, running, submit

MESSAGE = b"From: alice@example.com\r\nTo: x@client.example\r\nSubject: report\r\n\r\nbody\r\n"


async def test_upstream_451_is_retried_and_delivered_once_it_answers_250(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    answers = ["451 4.3.0 try later", "451 4.3.0 try later"]
    upstream.data_reply = lambda: answers.pop(0) if answers else None
    config = gateway_config(tmp_path, store_url, upstream.port)
    async with running(config) as gw:
        await submit(gw, ["x@client.example"], MESSAGE)
        received = await upstream.wait_for(1, timeout=15)
        for _ in range(100):  # the outcome is committed just after the upstream's 250
            async with gw.store.read() as session:
                row = (await session.scalars(select(Recipient))).one()
            if row.state != "deferred":
                break
            await asyncio.sleep(0.05)
    assert answers == []  # both 451s were seen
    assert len(received) == 1 and received[0].data == MESSAGE
    assert row.state == "delivered" and row.attempts == 3
    events = Path(config.audit.path).read_text()
    assert events.count('"event":"delivery.deferred"') == 2
    assert events.count('"event":"delivery.sent"') == 1


async def test_upstream_550_for_one_of_two_recipients_sends_a_dsn_and_delivers_the_other(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    upstream.rcpt_reply = lambda a: (
        "550 5.1.1 <gone@client.example>: no such user" if a.startswith("gone@") else None
    )
    config = gateway_config(tmp_path, store_url, upstream.port)
    async with running(config) as gw:
        await submit(gw, ["ok@client.example", "gone@client.example"], MESSAGE)
        received = await upstream.wait_for(2, timeout=10)
    original = [r for r in received if r.mail_from == "alice@example.com"]
    bounces = [r for r in received if r.mail_from == ""]
    assert [r.rcpt_tos for r in original] == [["ok@client.example"]]
    assert len(bounces) == 1 and bounces[0].rcpt_tos == ["alice@example.com"]
    dsn = email.message_from_bytes(bounces[0].data, policy=policy.default)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    status = next(p for p in dsn.walk() if p.get_content_type() == "message/delivery-status")
    text = status.as_string()
    assert "Final-Recipient: rfc822; gone@client.example" in text
    assert "Status: 5.1.1" in text and "ok@client.example" not in text
    assert b"body\r\n" not in bounces[0].data.split(b"text/rfc822-headers", 1)[1]


async def test_a_bounce_never_bounces(tmp_path: Path, sqlite_url: str, upstream: Upstream) -> None:
    upstream.rcpt_reply = lambda a: "550 5.1.1 no such user"
    config = gateway_config(tmp_path, sqlite_url, upstream.port)
    async with running(config) as gw:
        await submit(gw, ["x@client.example"], MESSAGE)
        for _ in range(100):
            await asyncio.sleep(0.05)
            async with gw.store.read() as session:
                rows = (await session.scalars(select(Recipient))).all()
            if len(rows) == 2 and all(r.state == "bounced" for r in rows):
                break
        await asyncio.sleep(0.3)
        async with gw.store.read() as session:
            rows = (await session.scalars(select(Recipient))).all()
    # the original recipient and the DSN to alice both bounced; no third message appeared
    assert sorted((r.address, r.state) for r in rows) == [
        ("alice@example.com", "bounced"),
        ("x@client.example", "bounced"),
    ]
    assert upstream.received == []


async def test_upstream_refusing_connections_defers_without_bouncing(
    tmp_path: Path, sqlite_url: str
) -> None:
    import socket

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    config = gateway_config(tmp_path, sqlite_url, dead_port)
    async with running(config) as gw:
        await submit(gw, ["x@client.example"], MESSAGE)
        await asyncio.sleep(1.0)
        async with gw.store.read() as session:
            row = (await session.scalars(select(Recipient))).one()
    assert row.state == "deferred"
    assert row.attempts >= 1 and row.last_code == 421
    assert "cannot connect" in (row.last_response or "")


def test_backoff_grows_exponentially_with_jitter_and_is_capped(
    tmp_path: Path, sqlite_url: str
) -> None:
    import random
    from datetime import UTC, datetime, timedelta

    from gateway.delivery import Delivery

    config = gateway_config(
        tmp_path, sqlite_url, None, delivery={"retry_initial": "1m", "retry_max": "1h"}
    )
    delivery = Delivery(
        None,
        None,
        None,
        config.delivery,
        lambda: datetime.now(UTC),  # type: ignore[arg-type]
        owner="t",
        reporting_host="gw.test",
        rng=random.Random(7),
    )
    waits = [delivery.backoff(n) for n in range(10)]
    assert timedelta(seconds=48) <= waits[0] <= timedelta(seconds=72)
    assert timedelta(seconds=96) <= waits[1] <= timedelta(seconds=144)
    assert all(w <= timedelta(hours=1.2) for w in waits)
    assert waits[9] >= timedelta(minutes=48)


async def test_slow_upstream_does_not_make_queued_claims_expire_and_send_twice(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    # Each send takes 0.4 s and the lease is 1 s. Claims beyond the free workers would
    # wait in the process while their lease ran out, be claimed again and go out twice.
    upstream.delay = 0.4
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        delivery={"workers": 2, "connections": 2, "lease": "1s"},
    )
    async with running(config) as gw:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
        await client.connect()
        for n in range(12):
            await client.sendmail(
                "alice@example.com", [f"r{n}@d{n}.example"], b"Subject: %d\r\n\r\nx\r\n" % n
            )
        await client.quit()
        await upstream.wait_for(12, timeout=30)
        await asyncio.sleep(1.5)
    subjects = sorted(r.data.split(b"\r\n", 1)[0] for r in upstream.received)
    assert len(subjects) == 12, subjects  # each exactly once
    assert len(set(subjects)) == 12


async def test_a_send_that_outlasts_its_lease_keeps_it_and_goes_out_once(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    # The upstream takes 3 s to answer DATA and the lease is 1 s: renewed every third
    # of a lease, it never runs out, so neither this gateway's next rounds nor
    # another instance claim the recipient again while the send is still going.
    upstream.delay = 3.0
    config = gateway_config(
        tmp_path, store_url, upstream.port, delivery={"lease": "1s", "timeout": "20s"}
    )
    async with running(config) as gw:
        await submit(gw, ["x@client.example"], MESSAGE)
        await asyncio.sleep(2.0)  # twice the lease, and the send is still going
        now = datetime.now(UTC)
        stolen = await gw.store.run(
            functools.partial(
                repo.claim_due,
                owner="another-instance",
                now=now,
                lease=timedelta(seconds=1),
                limit=10,
            ),
            durable=False,
        )
        received = await upstream.wait_for(1, timeout=15)
        await asyncio.sleep(1.5)  # a second send would arrive in this time
        async with gw.store.read() as session:
            row = (await session.scalars(select(Recipient))).one()
    assert stolen == [], "the lease of a send in progress ran out"
    assert len(upstream.received) == 1 and received[0].data == MESSAGE
    assert row.state == "delivered" and row.lease_owner is None
