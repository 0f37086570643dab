"""Fixtures: a real upstream SMTP server, a real gateway on free loopback ports, and
the store on SQLite or (with SEKISHO_TEST_PG_URL) on a fresh PostgreSQL database."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.app import Gateway
from gateway.config import Config, parse_config
from quarantine.repository import NewMessage
from quarantine.states import MessageState

PG_URL = os.environ.get("SEKISHO_TEST_PG_URL")
PG_SKIP = "PostgreSQL tests need SEKISHO_TEST_PG_URL (e.g. postgresql://postgres@127.0.0.1/test)"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes


@dataclass
class Upstream:
    """An aiosmtpd server standing in for the company's smarthost.

    `rcpt_reply(address)` and `data_reply()` may return a reply to refuse; None accepts.
    """

    port: int = 0
    received: list[Received] = field(default_factory=list)
    rcpt_reply: Callable[[str], str | None] = lambda _a: None
    data_reply: Callable[[], str | None] = lambda: None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    delay: float = 0.0  # seconds spent before answering DATA, like a slow smarthost

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_reply(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        reply = self.data_reply()
        if reply:
            return reply
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from or ""
        self.received.append(
            Received(sender, list(envelope.rcpt_tos), bytes(envelope.original_content or b""))
        )
        self.arrived.set()
        return "250 2.0.0 Ok: upstream queued"

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        async def enough() -> None:
            while sum(len(r.rcpt_tos) for r in self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout)
        return self.received


class UpstreamSMTP(SMTP):
    """aiosmtpd refuses `MAIL FROM:<>`; a real smarthost accepts the null sender of
    bounces (RFC 5321 §4.5.5), so this stand-in does too and records it as ""."""

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        if arg.strip().startswith("<>"):
            return "<>", arg.strip()[2:].strip()
        return super()._getaddr(arg)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamSMTP(up, hostname="upstream.test", decode_data=False, enable_SMTPUTF8=True),
        "127.0.0.1",
        0,
    )
    up.port = server.sockets[0].getsockname()[1]
    yield up
    server.close()


async def _create_pg_database() -> tuple[str, str]:
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(PG_URL or "")
    name = f"sekisho_t_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(
        host=base.host or "127.0.0.1",
        port=base.port or 5432,
        user=base.username or "postgres",
        database=base.database or "test",
    )
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return base.set(database=name).render_as_string(hide_password=False), name


async def _drop_pg_database(name: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(PG_URL or "")
    conn = await asyncpg.connect(
        host=base.host or "127.0.0.1",
        port=base.port or 5432,
        user=base.username or "postgres",
        database=base.database or "test",
    )
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sekisho.db'}"
        return
    if not PG_URL:
        pytest.skip(PG_SKIP)
    url, name = await _create_pg_database()
    yield url
    await _drop_pg_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sekisho.db'}"


def gateway_config(
    tmp_path: Path, store_url: str, upstream_port: int | None, **sections: dict[str, Any]
) -> Config:
    data: dict[str, Any] = {
        "smtp": {
            "listen": "127.0.0.1:0",
            "hostname": "gw.test",
            "trusted_networks": ["127.0.0.1/32"],
            "idle_timeout": "30s",
        },
        "delivery": {
            "upstream": f"smtp://127.0.0.1:{upstream_port}"
            if upstream_port
            else f"maildir:{tmp_path / 'outbox'}",
            "starttls": "off",
            "poll_interval": "50ms",
            "retry_initial": "200ms",
            "retry_max": "1s",
            "timeout": "10s",
        },
        "store": {"url": store_url},
        "admin": {"listen": "127.0.0.1:0"},
        "audit": {"path": str(tmp_path / "audit.log")},
        "organization": {"domains": ["example.com"]},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values} if isinstance(values, dict) else values
    return parse_config(data, base=tmp_path)


@asynccontextmanager
async def running(config: Config, **kwargs: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(config, **kwargs)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(grace=2)


MESSAGE = b"From: alice@example.com\r\nTo: bob@client.example\r\nSubject: hi\r\n\r\nhello\r\n"


def queued(
    message_id: str, *rcpts: str, raw: bytes = MESSAGE, sender: str = "alice@example.com"
) -> NewMessage:
    """A message as intake stores one that passed the rules: queued for delivery."""
    return NewMessage(
        id=message_id,
        mail_from=sender,
        rcpt_tos=list(rcpts),
        raw=raw,
        state=MessageState.QUEUED,
        verdict={},
    )


async def submit(
    gw: Gateway, rcpts: list[str], message: bytes = MESSAGE, sender: str = "alice@example.com"
) -> None:
    """One message through the gateway's SMTP port, as a mail client sends it."""
    import aiosmtplib

    await aiosmtplib.send(
        message,
        sender=sender,
        recipients=rcpts,
        hostname="127.0.0.1",
        port=gw.smtp_port,
        start_tls=False,
    )


def iso2022jp_message(sender: str = "alice@example.com", to: str = "bob@client.example") -> bytes:
    """Shaped like Outlook/Becky mail from a Japanese desk: ISO-2022-JP headers and body,
    a folded encoded-word Subject, and a header line that a re-folding parser would touch."""
    subject = "=?ISO-2022-JP?B?GyRCOC45JUUkTjNORycbKEI=?=\r\n =?ISO-2022-JP?B?GyRCJEckOSEjGyhC?="
    body = "いつもお世話になっております。\r\n見積書を送付いたします。\r\n".encode("iso-2022-jp")
    return (
        f"From: =?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <{sender}>\r\n"
        f"To: {to}\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0900\r\n"
        "Message-ID: <20261123100000.1234@example.com>\r\n"
        "X-Long-Header: "  # long enough that a re-folding parser would fold it
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbbbbbbbbb\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=ISO-2022-JP\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode("ascii") + body
