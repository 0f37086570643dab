"""Notices by mail: approvers learn of held mail with a link; senders learn why it is
held and what was decided. They travel the delivery queue like any other mail."""

from __future__ import annotations

import asyncio
from email import message_from_bytes, policy
from pathlib import Path

from tests.api_support import HOLD_FOR_COMPLIANCE, client, message, person, send
from tests.conftest import Received, Upstream, gateway_config, running
from tests.policies.messages import simple


def _text(received: Received) -> str:
    parsed = message_from_bytes(received.data, policy=policy.default)
    return f"{parsed['Subject']}\n{parsed.get_content()}"


async def _wait(upstream: Upstream, predicate: object, timeout: float = 10) -> list[Received]:
    for _ in range(int(timeout / 0.05)):
        found = [r for r in upstream.received if predicate(r)]  # type: ignore[operator]
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no such mail arrived; got {[r.rcpt_tos for r in upstream.received]}")


async def test_held_mail_notifies_approvers_and_sender_and_rejection_reaches_the_sender(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        rules=[HOLD_FOR_COMPLIANCE],
        admin={"listen": "127.0.0.1:0", "public_url": "https://sekisho.example.com"},
    )
    async with running(config) as gw:
        boss = await person(
            gw, "boss", "approver", emails=["boss@example.com"], groups=["compliance"]
        )
        await gw.credentials.refresh()
        message_id = await send(gw, message())
        to_boss = await _wait(upstream, lambda r: r.rcpt_tos == ["boss@example.com"])
        to_alice = await _wait(upstream, lambda r: r.rcpt_tos == ["alice@example.com"])
        async with client(gw, boss) as http:
            response = await http.post(
                f"/messages/{message_id}/reject", json={"reason": "顧客情報が含まれています"}
            )
            assert response.status_code == 200, response.text
        rejected = await _wait(
            upstream, lambda r: r.rcpt_tos == ["alice@example.com"] and "rejected" in _text(r)
        )
    approver_text = _text(to_boss[0])
    assert f"https://sekisho.example.com/api/v1/messages/{message_id}" in approver_text
    assert "hold-all" in approver_text and to_boss[0].mail_from == ""
    assert "held" in _text(to_alice[0]) and "group:compliance" in _text(to_alice[0])
    assert "顧客情報が含まれています" in _text(rejected[0])
    # the held original itself never left
    assert not [r for r in upstream.received if r.rcpt_tos == ["buyer@client.example"]]


async def test_approval_delivers_the_original_and_tells_the_sender(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port, rules=[HOLD_FOR_COMPLIANCE])
    raw = message()
    async with running(config) as gw:
        boss = await person(
            gw, "boss", "approver", emails=["boss@example.com"], groups=["compliance"]
        )
        await gw.credentials.refresh()
        message_id = await send(gw, raw)
        async with client(gw, boss) as http:
            assert (await http.post(f"/messages/{message_id}/approve")).status_code == 200
        original = await _wait(upstream, lambda r: r.rcpt_tos == ["buyer@client.example"])
        approved = await _wait(
            upstream, lambda r: r.rcpt_tos == ["alice@example.com"] and "approved" in _text(r)
        )
    assert original[0].data == raw
    assert "boss" in _text(approved[0])


async def test_zip_password_never_appears_in_the_api(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    password = "acme-pass-1234"
    rules = [{**HOLD_FOR_COMPLIANCE, "when": {"has_attachments": True}, "encrypt": True}]
    clients = [{"name": "acme", "domains": ["client.example"], "zip_password": password}]
    config = gateway_config(tmp_path, sqlite_url, upstream.port, rules=rules, clients=clients)
    async with running(config) as gw:
        admin = await person(gw, "root", "admin", emails=["root@example.com"])
        raw = simple(
            "見積書です",
            [("見積書.csv", b"item,price\r\nwidget,100\r\n", "text/csv")],
            to="buyer@client.example",
            sender="alice@example.com",
        )
        message_id = await send(gw, raw)
        async with client(gw, admin) as http:
            bodies = [
                (await http.get(path)).text
                for path in (
                    f"/messages/{message_id}",
                    f"/messages/{message_id}?unmask=true",
                    "/messages?state=held",
                    "/audit",
                )
            ]
            assert (await http.post(f"/messages/{message_id}/approve")).status_code == 200
            sent = await _wait(upstream, lambda r: r.rcpt_tos == ["buyer@client.example"])
            assert b"X-Sekisho-Protected: zip-aes256; files=1" in sent[0].data
            bodies.append((await http.get(f"/messages/{message_id}")).text)
    assert all(password not in body for body in bodies)
    assert password not in Path(config.audit.path).read_text()
