"""SMTP smuggling (CVE-2023-51764 family): a DATA with a non-standard end-of-data
sequence inside must stay one message here and at every hop after us."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.conftest import Upstream, gateway_config, running

SMUGGLED = (
    b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<victim@client.example>\r\nDATA\r\n"
    b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n"
)


async def _raw_session(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(
        b"EHLO attacker.test\r\nMAIL FROM:<alice@example.com>\r\n"
        b"RCPT TO:<bob@client.example>\r\nDATA\r\n"
    )
    await writer.drain()
    writer.write(payload + b"\r\n.\r\nQUIT\r\n")
    await writer.drain()
    transcript = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return transcript


@pytest.mark.parametrize(
    "separator",
    [
        b"\n.\r\n",
        b"\r.\r\n",
        b"\n.\n",
        b"\r\n.\n",
        b"\r\n.\r",
        b"\n.\r",
    ],
    ids=["LF.CRLF", "CR.CRLF", "LF.LF", "CRLF.LF", "CRLF.CR", "LF.CR"],
)
async def test_smtp_smuggling_never_makes_two_messages(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, separator: bytes
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port)
    payload = b"From: alice@example.com\r\nSubject: hello\r\n\r\nfirst part" + separator + SMUGGLED
    async with running(config) as gw:
        transcript = await _raw_session(gw.smtp_port, payload)
        await upstream.wait_for(1)
        await asyncio.sleep(0.5)
    assert transcript.count(b"queued as") == 1
    assert len(upstream.received) == 1
    delivered = upstream.received[0]
    assert delivered.rcpt_tos == ["bob@client.example"]
    # The smuggled commands arrived as text inside the one message, with every bare
    # CR or LF turned into CRLF, so no later hop can read them as an end of data.
    assert b"smuggled body" in delivered.data
    body = delivered.data.replace(b"\r\n", b"")
    assert b"\r" not in body and b"\n" not in body


async def test_bare_newlines_are_refused_when_configured(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port, smtp={"bare_newline": "reject"})
    async with running(config) as gw:
        transcript = await _raw_session(gw.smtp_port, b"Subject: x\r\n\r\nline\n.\r\n" + SMUGGLED)
    assert b"550 5.6.0" in transcript
    assert b"queued as" not in transcript
    assert upstream.received == []
