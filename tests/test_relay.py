"""The relay path end to end: a client submits, the gateway stores, the upstream receives."""

from __future__ import annotations

import asyncio
import json
import shutil
import smtplib
import subprocess
import sys
from pathlib import Path

import aiosmtplib
import pytest

from gateway.audit import verify
from tests.conftest import Upstream, gateway_config, iso2022jp_message, running


async def test_untouched_message_reaches_upstream_byte_identical(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, store_url, upstream.port)
    raw = iso2022jp_message()
    async with running(config) as gw:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
        await client.connect()
        _, reply = await client.sendmail("alice@example.com", ["bob@client.example"], raw)
        await client.quit()
        received = await upstream.wait_for(1)
    assert reply.startswith("2.0.0 Ok: queued as ")
    message_id = reply.rsplit(" ", 1)[1]
    assert received[0].data == raw
    assert received[0].mail_from == "alice@example.com"
    assert received[0].rcpt_tos == ["bob@client.example"]
    lines = [json.loads(line) for line in Path(config.audit.path).read_text().splitlines()]
    events = [(e["event"], e.get("id")) for e in lines]
    assert ("message.accepted", message_id) in events
    assert ("delivery.sent", message_id) in events
    assert verify(config.audit.path).ok


def test_audit_verify_command_passes_on_a_real_log(tmp_path: Path, sqlite_url: str) -> None:
    config = gateway_config(tmp_path, sqlite_url, None)

    async def send_one() -> None:
        async with running(config) as gw:
            await aiosmtplib.send(
                iso2022jp_message(),
                sender="alice@example.com",
                recipients=["bob@client.example"],
                hostname="127.0.0.1",
                port=gw.smtp_port,
                start_tls=False,
            )
            await asyncio.sleep(0.3)

    asyncio.run(send_one())
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", "--path", config.audit.path],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: ")
    # and it notices tampering, naming the line
    log = Path(config.audit.path)
    lines = log.read_text().splitlines()
    lines[1] = lines[1].replace("alice@example.com", "mallory@example.com")
    log.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", "--path", str(log)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "broken at line 2" in result.stderr


async def test_maildir_upstream_writes_one_file_per_recipient(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = gateway_config(tmp_path, sqlite_url, None)
    raw = iso2022jp_message()
    async with running(config) as gw:

        def submit() -> None:  # smtplib blocks: run it off the gateway's loop
            with smtplib.SMTP("127.0.0.1", gw.smtp_port) as client:
                client.sendmail("alice@example.com", ["a@client.example", "b@other.example"], raw)

        await asyncio.to_thread(submit)
        for _ in range(100):
            files = list((tmp_path / "outbox" / "new").glob("*"))
            if len(files) == 2:
                break
            await asyncio.sleep(0.05)
    assert len(files) == 2
    assert not list((tmp_path / "outbox" / "tmp").glob("*"))
    bodies = sorted(f.read_bytes() for f in files)
    assert all(b.endswith(raw) for b in bodies)
    assert {b.split(b"\r\n")[1] for b in bodies} == {
        b"Delivered-To: a@client.example",
        b"Delivered-To: b@other.example",
    }


@pytest.mark.skipif(
    shutil.which("swaks") is None, reason="swaks is not installed (apt-get install swaks)"
)
async def test_swaks_submission_is_queued_and_delivered(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port)
    async with running(config) as gw:
        proc = await asyncio.create_subprocess_exec(
            "swaks",
            "--server",
            f"127.0.0.1:{gw.smtp_port}",
            "--from",
            "alice@example.com",
            "--to",
            "bob@client.example",
            "--header",
            "Subject: swaks test",
            "--body",
            "hello from swaks",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        received = await upstream.wait_for(1)
    transcript = out.decode()
    assert proc.returncode == 0, transcript
    assert "<-  250 2.0.0 Ok: queued as " in transcript
    assert b"Subject: swaks test" in received[0].data


async def test_store_failure_answers_451_and_the_next_message_succeeds(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port)
    async with running(config) as gw:
        import quarantine.repository as repo

        real = repo.add_messages
        calls = {"n": 0}

        def failing_once(*args: object, **kwargs: object) -> object:
            calls["n"] += 1
            claims = real(*args, **kwargs)  # type: ignore[arg-type]
            if calls["n"] == 1:
                raise OSError(28, "No space left on device")
            return claims

        monkeypatch.setattr("quarantine.repository.add_messages", failing_once)
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=gw.smtp_port, start_tls=False)
        await client.connect()
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await client.sendmail(
                "alice@example.com", ["bob@client.example"], b"Subject: 1\r\n\r\nx\r\n"
            )
        assert refused.value.code == 451
        _, reply = await client.sendmail(
            "alice@example.com", ["bob@client.example"], b"Subject: 2\r\n\r\ny\r\n"
        )
        await client.quit()
        assert "queued as" in reply
        await upstream.wait_for(1)
        await asyncio.sleep(0.3)
    # the failed transaction left nothing behind: exactly one message was delivered
    assert [r.data for r in upstream.received] == [b"Subject: 2\r\n\r\ny\r\n"]
