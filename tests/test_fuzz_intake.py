"""Fuzzing intake and facts: whatever bytes arrive after DATA, the answer is a reply.

Random and mutated MIME goes through `Intake.submit` with a real store and the real
policy engine. Each submission must yield `250 … queued as <id>` or a 4xx/5xx reply
string, never an exception, and a 250 must mean the message and all its recipients
are stored. Bounded: 150 examples, a few seconds.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from gateway.audit import AuditLog
from gateway.intake import Intake, Submission
from policies.engine import Policy
from quarantine.db import Store
from quarantine.migrate import upgrade
from quarantine.models import Body, Message, Recipient

POLICY = Policy.compile(
    [
        {"name": "hold-uninspected", "when": {"not_fully_inspected": True}, "action": "hold"},
        {"name": "refuse-cards", "when": {"pii": ["credit_card"]}, "action": "refuse"},
        {"name": "hold-zips", "when": {"attachment_type": ["zip"]}, "action": "hold"},
    ],
    [{"name": "acme", "domains": ["acme.example"], "markers": ["ACME"]}],
    ["example.com"],
)
REPLY = re.compile(r"(250 2\.0\.0 Ok: queued as (\S+)|[45]\d\d [245]\.\d{1,3}\.\d{1,3} .+)")

SEED = (
    b"From: alice@example.com\r\nTo: bob@acme.example\r\nSubject: =?utf-8?B?5p2l?=\r\n"
    b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="XX"\r\n\r\n'
    b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ncard 4111 1111 1111 1111\r\n"
    b'--XX\r\nContent-Type: application/zip; name="a.zip"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename*=UTF-8''%E8%A6%8B.zip\r\n\r\n"
    b"UEsDBBQAAAAIAAAAIQAAAAAAAAAAAAAAAAAFAAAAYS50eHQDAFBLAQIUABQAAAAIAAAAIQA=\r\n"
    b"--XX\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Type: text/html\r\n"
    b"\r\n<p>ACME &amp; co</p>\r\n--XX--\r\n"
)
TOKENS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b"--XX",
    b"--XX--",
    b"\r\n\r\n",
    b"Content-Type: ",
    b"multipart/mixed; boundary=",
    b"message/rfc822",
    b"base64",
    b"=?",
    b"?=",
    b"=\r\n",
    b"filename*0*=",
    b"charset=iso-2022-jp",
    b"\x1b$B",
    b"\xff\xfe",
    b"\xe8\xa6\x8b",
    b"PK\x03\x04",
    b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Disposition: attachment",
    b'"',
    b";",
    b":",
    b" ",
    b"\t",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(SEED)
    for _ in range(draw(st.integers(0, 12))):
        at = draw(st.integers(0, len(data)))
        match draw(st.sampled_from(["insert", "delete", "flip", "token", "repeat"])):
            case "insert":
                data[at:at] = draw(st.binary(max_size=32))
            case "delete":
                del data[at : at + draw(st.integers(1, 64))]
            case "flip":
                if data:
                    data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
            case "token":
                data[at:at] = draw(st.sampled_from(TOKENS))
            case "repeat":
                chunk = bytes(data[at : at + draw(st.integers(1, 40))])
                data[at:at] = chunk * draw(st.integers(1, 50))
    return bytes(data)


messages = st.one_of(st.binary(max_size=2048), mutated())
addresses = st.sampled_from(
    ["bob@acme.example", "carol@example.com", "dave@other.example", "ünï@例え.jp"]
)


@pytest.fixture
def intake(tmp_path: Path) -> Iterator[tuple[asyncio.AbstractEventLoop, Intake, Store]]:
    loop = asyncio.new_event_loop()
    store = Store(f"sqlite:///{tmp_path / 'fuzz.db'}")
    loop.run_until_complete(upgrade(store))
    audit = AuditLog(str(tmp_path / "audit.log"))
    intake = Intake(store, audit, lambda: POLICY, lambda: datetime.now(UTC))
    try:
        yield loop, intake, store
    finally:
        loop.run_until_complete(intake.close())
        loop.run_until_complete(store.close())
        audit.close()
        loop.close()


async def _stored(store: Store, message_id: str) -> tuple[int, int, int]:
    async with store.read() as session:
        message = await session.scalar(select(func.count()).where(Message.id == message_id))
        body = await session.scalar(select(func.count()).where(Body.message_id == message_id))
        rcpts = await session.scalar(select(func.count()).where(Recipient.message_id == message_id))
    return int(message or 0), int(body or 0), int(rcpts or 0)


@pytest.mark.timeout(60)
def test_random_and_mutated_mime_always_gets_a_reply_and_250_means_stored(
    intake: tuple[asyncio.AbstractEventLoop, Intake, Store],
) -> None:
    loop, gate, store = intake
    seen: dict[str, int] = {}

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(data=messages, rcpts=st.lists(addresses, min_size=1, max_size=3, unique=True))
    def submit(data: bytes, rcpts: list[str]) -> None:
        submission = Submission("alice@example.com", tuple(rcpts), data, "127.0.0.1")
        reply = loop.run_until_complete(gate.submit(submission))
        match = REPLY.fullmatch(reply)
        assert match, f"not an SMTP reply: {reply!r}"
        seen[reply[:3]] = seen.get(reply[:3], 0) + 1
        if match.group(2):
            assert loop.run_until_complete(_stored(store, match.group(2))) == (1, 1, len(rcpts))

    submit()
    print(f"\nfuzz replies: {seen}")
    assert seen.get("250", 0) > 0  # the fuzzer reached the store
