"""Helpers for the HTTP API tests: people with tokens, held mail sent over SMTP, a clock."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx

from gateway.app import Gateway
from gateway.cli_tokens import hash_token, new_token
from quarantine import accounts
from quarantine.accounts import Role
from tests.policies.messages import plain

HOLD_FOR_COMPLIANCE: dict[str, Any] = {
    "name": "hold-all",
    "when": {"has_attachments": False},
    "action": "hold",
    "approvers": ["group:compliance"],
}


class Clock:
    """An injectable clock that only moves when a test moves it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


async def person(
    gw: Gateway,
    name: str,
    role: str,
    *,
    emails: Sequence[str] = (),
    groups: Sequence[str] = (),
    expires_at: datetime | None = None,
) -> str:
    """Add a user and return a fresh API token for them."""
    now = datetime.now(UTC)
    token, prefix = new_token()
    async with gw.store.transaction() as session:
        await accounts.add_user(
            session,
            name=name,
            password_hash=None,
            role=Role(role),
            emails=emails,
            groups=groups,
            now=now,
        )
        await accounts.add_token(
            session,
            user=name,
            token_hash=hash_token(token),
            prefix=prefix,
            label=None,
            expires_at=expires_at,
            now=now,
        )
    return token


def message(body: str = "お見積りの件です。\r\n", sender: str = "alice@example.com") -> bytes:
    return plain(body, sender=sender, to="buyer@client.example")


async def send(
    gw: Gateway, raw: bytes, sender: str = "alice@example.com", to: str = "buyer@client.example"
) -> str:
    """Submit over SMTP from a trusted address; return the queued id from the 250."""
    _, reply = await aiosmtplib.send(
        raw,
        sender=sender,
        recipients=[to],
        hostname="127.0.0.1",
        port=gw.smtp_port,
        start_tls=False,
    )
    assert "queued as " in reply, reply
    return reply.rsplit("queued as ", 1)[1].strip()


def client(gw: Gateway, token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{gw.http_port}/api/v1", headers=headers, timeout=10
    )


def audit_events(gw: Gateway, event: str) -> list[dict[str, Any]]:
    lines = Path(gw.config.audit.path).read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == event]
