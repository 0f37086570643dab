"""Never an open relay: who may send, and as whom."""

from __future__ import annotations

import asyncio
import itertools
import smtplib
from pathlib import Path

import aiosmtplib
import pytest

from gateway.credentials import hash_password
from quarantine import accounts
from tests.conftest import Upstream, gateway_config, running

MESSAGE = b"Subject: hi\r\n\r\nhello\r\n"


async def _add_user(gw: object, name: str, password: str, emails: list[str]) -> None:
    from datetime import UTC, datetime

    async with gw.store.transaction() as session:  # type: ignore[attr-defined]
        await accounts.add_user(
            session,
            name=name,
            password_hash=hash_password(password),
            role=accounts.Role.SENDER,
            emails=emails,
            groups=["sales"],
            now=datetime.now(UTC),
        )
    await gw.credentials.refresh()  # type: ignore[attr-defined]


async def test_unauthenticated_relay_from_an_untrusted_address_is_refused(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    # Loopback is not in trusted_networks here, so the client counts as untrusted.
    config = gateway_config(tmp_path, sqlite_url, upstream.port, smtp={"trusted_networks": []})
    async with running(config) as gw:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
        await client.connect()
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.sendmail("alice@example.com", ["x@client.example"], MESSAGE)
        await client.quit()
    assert refused.value.code == 530
    assert "Authentication required" in refused.value.message
    assert upstream.received == []


async def test_auth_off_refuses_clients_outside_trusted_networks(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path, sqlite_url, upstream.port, smtp={"trusted_networks": [], "auth": "off"}
    )
    async with running(config) as gw:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
        await client.connect()
        assert not client.supports_extension("auth")
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.sendmail("alice@example.com", ["x@client.example"], MESSAGE)
        await client.quit()
    assert refused.value.code == 550


async def test_authenticated_user_may_send_only_as_their_own_addresses(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path, sqlite_url, upstream.port, smtp={"trusted_networks": [], "auth": "required"}
    )
    async with running(config) as gw:
        await _add_user(gw, "alice", "correct horse", ["alice@example.com"])
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
        await client.connect()
        await client.login("alice", "correct horse")
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await client.sendmail("ceo@example.com", ["x@client.example"], MESSAGE)
        assert refused.value.code == 553
        _, reply = await client.sendmail("alice@example.com", ["x@client.example"], MESSAGE)
        await client.quit()
        await upstream.wait_for(1)
    assert "queued as" in reply
    assert [r.mail_from for r in upstream.received] == ["alice@example.com"]
    audit = Path(config.audit.path).read_text()
    assert '"event":"auth.sender_mismatch"' in audit
    assert "correct horse" not in audit


async def test_wrong_password_is_refused_audited_and_slowed(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port, smtp={"auth": "required"})
    async with running(config) as gw:
        await _add_user(gw, "alice", "correct horse", ["alice@example.com"])

        def attempt(password: str) -> int:
            with smtplib.SMTP("127.0.0.1", gw.smtp_port) as client:
                client.ehlo("t")
                try:
                    client.login("alice", password)
                except smtplib.SMTPAuthenticationError as error:
                    return error.smtp_code
                return 235

        loop = asyncio.get_running_loop()
        assert await asyncio.to_thread(attempt, "wrong") == 535
        started = loop.time()
        assert await asyncio.to_thread(attempt, "wrong again") == 535
        slowed = loop.time() - started
        assert await asyncio.to_thread(attempt, "correct horse") == 235
    assert slowed >= 0.5  # the second failure from the same address waited
    audit = Path(config.audit.path).read_text()
    # smtplib tries each offered mechanism (PLAIN, then LOGIN): two refusals per login
    assert audit.count('"event":"auth.failed"') == 4
    assert "wrong again" not in audit


async def test_password_check_does_not_block_other_sessions(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port)
    async with running(config) as gw:
        await _add_user(gw, "alice", "correct horse", ["alice@example.com"])
        loop = asyncio.get_running_loop()
        ticks: list[float] = []

        async def ticker() -> None:
            for _ in range(40):
                ticks.append(loop.time())
                await asyncio.sleep(0.005)

        async def logins() -> None:
            for n in range(4):
                await gw.credentials.check("alice", f"wrong {n}")

        await asyncio.gather(ticker(), logins())
        # one argon2 check on this thread, to compare with: what the loop would have
        # stalled for had the check run on it
        from gateway.credentials import _verify, dummy_hash

        dummy_hash()  # made once; time only the verification

        started = loop.time()
        _verify(dummy_hash(), "x")
        one_hash = loop.time() - started
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) - 0.005 < one_hash * 0.5, (max(gaps), one_hash)


async def test_recipient_cap_answers_452_and_size_limit_552(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path, sqlite_url, upstream.port, smtp={"max_recipients": 3, "max_message_size": "10KiB"}
    )
    async with running(config) as gw:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
        await client.connect()
        await client.mail("alice@example.com")
        codes = [(await client.rcpt(f"r{n}@client.example")).code for n in range(3)]
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as over:
            await client.rcpt("r3@client.example")
        await client.rset()
        assert client.supports_extension("size")
        assert client.esmtp_extensions["size"] == str(10 * 1024)
        with pytest.raises(aiosmtplib.SMTPResponseException) as too_big:
            await client.sendmail("alice@example.com", ["a@client.example"], b"x" * 20_000)
        await client.quit()
    assert codes == [250, 250, 250]
    assert over.value.code == 452
    assert too_big.value.code == 552


async def test_connection_cap_answers_421(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port, smtp={"max_connections": 2})
    async with running(config) as gw:
        held = [await asyncio.open_connection("127.0.0.1", gw.smtp_port) for _ in range(2)]
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220")
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.smtp_port)
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        for _, w in held:
            w.close()
    assert line.startswith(b"421 4.3.2")


async def test_too_many_errors_closes_the_session(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port, smtp={"max_errors": 3})
    async with running(config) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.smtp_port)
        await reader.readline()
        writer.write(b"EHLO t\r\n" + b"RCPT TO:<x@y.example>\r\n" * 6)
        await writer.drain()
        transcript = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert b"421 4.7.0 Too many errors" in transcript
    assert transcript.count(b"503") == 3
