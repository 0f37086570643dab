"""Attachment protection at delivery: one copy per client company, each openable only
with that company's password, by the tools recipients use; the password reaches the
sender by a separate notice and nowhere else."""

from __future__ import annotations

import asyncio
import io
import json
import re
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import pyzipper
from sqlalchemy import select

from policies.transforms.encrypt import EncryptError
from quarantine.models import Message, Recipient
from tests.conftest import Received, Upstream, gateway_config, running
from tests.transforms import samples
from tests.transforms.tools import extract_7z, extract_unzip, files_in

ACME_PASSWORD = "acme-pass-1234"
GLOBEX_PASSWORD = "globex-pass-5678"
CLIENTS = [
    {
        "name": "acme",
        "domains": ["acme.example"],
        "markers": ["ACME"],
        "zip_password": ACME_PASSWORD,
        "zip_method": "aes256",
    },
    {
        "name": "globex",
        "domains": ["globex.example"],
        "markers": ["GLOBEX"],
        "zip_password": GLOBEX_PASSWORD,
        "zip_method": "zipcrypto",
    },
    {"name": "initech", "domains": ["initech.example"], "markers": ["INITECH"]},
]
ENCRYPT_EXTERNAL = [
    {
        "name": "encrypt-external",
        "when": {"recipients": "any_external", "has_attachments": True},
        "action": "deliver",
        "encrypt": True,
    }
]


def _zips(data: bytes) -> dict[str, bytes]:
    message = message_from_bytes(data, policy=policy.default)
    return {
        p.get_filename(): p.get_payload(decode=True)
        for p in message.walk()
        if (p.get_filename() or "").endswith(".zip")
    }


def _for(received: list[Received], rcpt: str) -> bytes:
    return next(r.data for r in received if rcpt in r.rcpt_tos)


async def _send(port: int, raw: bytes, rcpts: list[str]) -> None:
    await aiosmtplib.send(
        raw,
        sender="yamada@example.com",
        recipients=rcpts,
        hostname="127.0.0.1",
        port=port,
        start_tls=False,
    )


async def test_two_clients_get_two_copies_each_openable_only_with_its_own_password(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path,
        store_url,
        upstream.port,
        clients=CLIENTS,
        rules=ENCRYPT_EXTERNAL,
        encryption={"notify": "none"},
    )
    raw = samples.outlook_message()
    async with running(config) as gw:
        await _send(
            gw.smtp_port, raw, ["client@acme.example", "buyer@globex.example", "boss@example.com"]
        )
        received = await upstream.wait_for(3)
    assert len(received) == 3  # acme's copy, globex's copy, the internal original
    assert _for(received, "boss@example.com") == raw
    acme_zips = _zips(_for(received, "client@acme.example"))
    globex_zips = _zips(_for(received, "buyer@globex.example"))
    assert (
        set(acme_zips)
        == set(globex_zips)
        == {f"{samples.XLSX_NAME}.zip", f"{samples.PDF_NAME}.zip"}
    )
    xlsx_zip = acme_zips[f"{samples.XLSX_NAME}.zip"]
    with pyzipper.AESZipFile(io.BytesIO(xlsx_zip)) as archive:
        archive.setpassword(ACME_PASSWORD.encode())
        assert archive.namelist() == [samples.XLSX_NAME]
        assert archive.read(samples.XLSX_NAME) == samples.xlsx_bytes()
        archive.setpassword(GLOBEX_PASSWORD.encode())
        with pytest.raises(RuntimeError):
            archive.read(samples.XLSX_NAME)
    header = _for(received, "client@acme.example").split(b"\r\n\r\n", 1)[0]
    assert b"X-Sekisho-Protected: zip-aes256; files=2" in header


async def test_zipcrypto_copy_opens_with_unzip_and_7z_and_not_with_the_other_password(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        clients=CLIENTS,
        rules=ENCRYPT_EXTERNAL,
        encryption={"notify": "none"},
    )
    async with running(config) as gw:
        await _send(gw.smtp_port, samples.outlook_message(), ["buyer@globex.example"])
        received = await upstream.wait_for(1)
    archive = tmp_path / "x.zip"
    archive.write_bytes(_zips(received[0].data)[f"{samples.XLSX_NAME}.zip"])
    for extract in (extract_unzip, extract_7z):
        good = tmp_path / f"good-{extract.__name__}"
        result = extract(archive, GLOBEX_PASSWORD, good)
        assert result.returncode == 0, result.stdout + result.stderr
        assert files_in(good) == {samples.XLSX_NAME: samples.xlsx_bytes()}
        bad = tmp_path / f"bad-{extract.__name__}"
        assert extract(archive, ACME_PASSWORD, bad).returncode != 0
        # ZipCrypto's password check is one byte (APPNOTE 6.1.6), so 1 time in 256 a
        # wrong password gets past it and the tool writes garbage before the CRC check
        # fails; what matters is that the file itself is never recovered.
        leaked = [p for p in bad.rglob("*") if p.is_file()] if bad.exists() else []
        assert all(p.read_bytes() != samples.xlsx_bytes() for p in leaked)


async def test_sender_gets_one_notice_with_the_password_and_it_is_nowhere_else(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        clients=CLIENTS,
        rules=ENCRYPT_EXTERNAL,
        encryption={"notify": "sender"},
    )
    async with running(config) as gw:
        # initech has no password of its own: a random one per message is used
        await _send(
            gw.smtp_port,
            samples.outlook_message(),
            ["a@initech.example", "b@initech.example", "c@acme.example"],
        )
        received = await upstream.wait_for(4)
        async with gw.store.read() as session:
            verdicts = [m.verdict for m in (await session.scalars(select(Message))).all()]
    notices = [r for r in received if r.rcpt_tos == ["yamada@example.com"]]
    assert len(notices) == 1 and notices[0].mail_from == ""
    text = message_from_bytes(notices[0].data, policy=policy.default).get_content()
    found = re.findall(r"Password: (\S+)", text)
    assert len(found) == 2  # initech's random password (once for both) and acme's
    random_password = next(p for p in found if p != ACME_PASSWORD)
    assert len(random_password) >= 16 and not set(random_password) & set("0O1lI")
    initech = [r for r in received if r.rcpt_tos[0].endswith("@initech.example")]
    assert len(initech) == 1 and sorted(initech[0].rcpt_tos) == [
        "a@initech.example",
        "b@initech.example",
    ]
    zipped = _zips(initech[0].data)[f"{samples.XLSX_NAME}.zip"]
    with pyzipper.AESZipFile(io.BytesIO(zipped)) as archive:
        archive.setpassword(random_password.encode())
        assert archive.read(samples.XLSX_NAME) == samples.xlsx_bytes()
    audit = Path(config.audit.path).read_text()
    for secret in (random_password, ACME_PASSWORD):
        assert secret not in audit
        assert secret not in json.dumps(verdicts)
    assert '"event":"protection.applied"' in audit and '"event":"notice.queued"' in audit


async def test_bcc_rule_hides_external_recipients_from_the_headers(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    rules = [{"name": "many-external", "when": {"external_recipients_at_least": 2}, "bcc": True}]
    config = gateway_config(tmp_path, sqlite_url, upstream.port, rules=rules)
    raw = (
        b"From: yamada@example.com\r\nTo: a@x.example, b@y.example\r\n"
        b"Cc: boss@example.com\r\nSubject: hello\r\n\r\nbody\r\n"
    )
    async with running(config) as gw:
        await _send(gw.smtp_port, raw, ["a@x.example", "b@y.example", "boss@example.com"])
        received = await upstream.wait_for(3)
    for r in received:
        headers = r.data.split(b"\r\n\r\n", 1)[0]
        assert b"a@x.example" not in headers and b"b@y.example" not in headers
        assert b"Cc: boss@example.com" in headers
        assert r.data.endswith(b"\r\n\r\nbody\r\n")


async def test_message_that_cannot_be_protected_is_held_not_sent(
    tmp_path: Path, sqlite_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cannot_protect(*_args: Any, **_kwargs: Any) -> Any:
        raise EncryptError("injected: the attachment could not be zipped")

    monkeypatch.setattr("gateway.protect.encrypt_attachments", cannot_protect)
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        clients=CLIENTS,
        rules=ENCRYPT_EXTERNAL,
        encryption={"notify": "none"},
    )
    async with running(config) as gw:
        await _send(gw.smtp_port, samples.outlook_message(), ["c@acme.example"])
        message = await _settled(gw)
    assert message.state == "held" and message.rule == "protection-failed"
    # it waits for a person for [approval].expire_after, not for a delay long past
    assert message.release_at is not None
    assert message.release_at > datetime.now(UTC) + timedelta(days=2)
    assert upstream.received == []
    assert '"event":"message.held"' in Path(config.audit.path).read_text()


async def test_message_with_more_parts_than_inspected_is_held_at_intake_not_sent(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        clients=CLIENTS,
        rules=ENCRYPT_EXTERNAL,
        encryption={"notify": "none"},
    )
    parts = [
        samples.part(
            [f'Content-Type: text/plain; name="f{n}.txt"', "Content-Disposition: attachment"],
            b"x",
        )
        for n in range(2100)
    ]
    raw = samples.mixed(
        *parts, headers=("From: yamada@example.com", "To: c@acme.example", "Subject: many files")
    )
    async with running(config) as gw:
        await _send(gw.smtp_port, raw, ["c@acme.example"])
        message = await _settled(gw)
        await asyncio.sleep(0.3)  # a delivery round would have sent it by now
    assert message.state == "held" and message.rule == "not-inspected"
    assert message.verdict["encrypt"]  # approved later, it still leaves protected
    # only the sender's "held" notice left; nothing reached the recipient
    assert [r.rcpt_tos for r in upstream.received] in ([], [["yamada@example.com"]])


async def _settled(gw: Any) -> Message:
    for _ in range(100):
        async with gw.store.read() as session:
            message: Message = (await session.scalars(select(Message))).one()
        if message.state != "queued":
            return message
        await asyncio.sleep(0.05)
    return message


def _is_notice(received: Received) -> bool:
    return b"Auto-Submitted: auto-generated" in received.data and received.mail_from == ""


def _answer_451_first(upstream: Upstream, times: int) -> list[str]:
    """The smarthost defers the protected mail `times` times (not the notices)."""
    answered: list[str] = []
    handle = upstream.handle_DATA

    async def handle_DATA(server: Any, session: Any, envelope: Any) -> str:
        content = bytes(envelope.original_content or b"")
        if b"Auto-Submitted: auto-generated" not in content and len(answered) < times:
            answered.append("451")
            return "451 4.3.0 try again later"
        return await handle(server, session, envelope)

    upstream.handle_DATA = handle_DATA  # type: ignore[method-assign]
    return answered


async def test_recipients_later_notice_leaves_only_after_the_protected_mail(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        clients=CLIENTS,
        rules=ENCRYPT_EXTERNAL,
        encryption={"notify": "recipients_later", "notify_delay": "200ms"},
    )
    deferred = _answer_451_first(upstream, 3)  # ~0.2 + 0.4 + 0.8 s of retries
    rcpts = ["a@initech.example", "b@initech.example"]
    async with running(config) as gw:
        await _send(gw.smtp_port, samples.outlook_message(), rcpts)
        received = await upstream.wait_for(4, timeout=15)
    assert len(deferred) == 3
    # Retries may split the copies (each recipient has its own jittered retry time),
    # but both reached their recipients before the key to them left.
    copies = [r for r in received if not _is_notice(r)]
    notices = [r for r in received if _is_notice(r)]
    # each recipient's notice leaves only after that recipient's protected copy
    for rcpt in rcpts:
        copy_at = next(i for i, r in enumerate(received) if rcpt in r.rcpt_tos and r in copies)
        notice_at = next(i for i, r in enumerate(received) if r.rcpt_tos == [rcpt] and r in notices)
        assert copy_at < notice_at, (rcpt, [(r.rcpt_tos, _is_notice(r)) for r in received])
    assert sorted(a for c in copies for a in c.rcpt_tos) == rcpts
    # one notice per recipient: neither learns who else got the file
    assert sorted(n.rcpt_tos[0] for n in notices) == rcpts
    assert all(len(n.rcpt_tos) == 1 and n.mail_from == "" for n in notices)
    protected = copies[0]
    passwords = set()
    for n in notices:
        text = message_from_bytes(n.data, policy=policy.default).get_content()
        other = next(r for r in rcpts if r != n.rcpt_tos[0])
        assert other not in text
        passwords.update(re.findall(r"Password: (\S+)", text))
    (password,) = passwords
    zipped = _zips(protected.data)[f"{samples.XLSX_NAME}.zip"]
    with pyzipper.AESZipFile(io.BytesIO(zipped)) as archive:
        archive.setpassword(password.encode())
        assert archive.read(samples.XLSX_NAME) == samples.xlsx_bytes()
    audit = [json.loads(line) for line in Path(config.audit.path).read_text().splitlines()]
    events = [e["event"] for e in audit]
    assert events.index("notice.scheduled") > events.index("delivery.sent")


async def test_recipients_later_notice_skips_a_recipient_the_protected_mail_never_reached(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        clients=CLIENTS,
        rules=ENCRYPT_EXTERNAL,
        encryption={"notify": "recipients_later", "notify_delay": "200ms"},
    )
    upstream.rcpt_reply = lambda a: "550 5.1.1 no such user" if a.startswith("b@") else None
    async with running(config) as gw:
        await _send(
            gw.smtp_port, samples.outlook_message(), ["a@initech.example", "b@initech.example"]
        )
        received = await upstream.wait_for(3, timeout=15)  # the ZIP, a bounce, the notice
        await asyncio.sleep(0.5)  # and nothing more
        async with gw.store.read() as session:
            told = await session.execute(
                select(Recipient.address, Recipient.state, Message.state)
                .join(Message, Message.id == Recipient.message_id)
                .where(Message.kind == "notice")
            )
    notices = [
        r for r in upstream.received if _is_notice(r) and r.rcpt_tos != ["yamada@example.com"]
    ]
    assert [n.rcpt_tos for n in notices] == [["a@initech.example"]]
    # b's notice was never tried (not refused by the smarthost): no ZIP, no password.
    assert {a: (r.value, m.value) for a, r, m in told.all()} == {
        "a@initech.example": ("delivered", "delivered"),
        "b@initech.example": ("cancelled", "cancelled"),
    }
    assert len(received) == 3
