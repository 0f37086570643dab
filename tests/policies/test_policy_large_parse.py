"""A large message is inspected without handing its long base64 bodies to the email
package (policies.parsed), and its facts are exactly those of the whole parse."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from messages import (
    CRLF,
    attachment,
    b64,
    forwarded,
    html_inline_image_and_xlsx,
    mixed,
    part,
    plain_zip,
    simple,
    xlsx,
)
from policy_samples import NOW

from policies.engine import Policy, inspect
from policies.envelope import Envelope
from policies.facts import MessageFacts, build_facts
from policies.mime import parse
from policies.parsed import LEAN_BYTES, Parsed, parse_message

ENVELOPE = Envelope(mail_from="taro@corp.example", rcpt_tos=("hanako@acme.example",))
CARD = "4111 1111 1111 1111"


def noise(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def lf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n")


def big_text_body() -> bytes:
    """A base64 text body with a card number near its end (read from the raw bytes)."""
    text = ("議事録の続きです。\n" * 20_000 + f"カード番号 {CARD}\n").encode()
    body = f"Content-Type: text/plain; charset=utf-8{CRLF}Content-Transfer-Encoding: base64"
    return mixed("see below", [f"{body}{CRLF}{CRLF}{b64(text)}{CRLF}"])


def broken_padding() -> bytes:
    """Base64 that binascii refuses and the email package repairs (a lost last byte)."""
    raw = simple("files", [("data.bin", noise(400_000), "application/octet-stream")])
    return raw.replace(b"=\r\n------=_Part_0_1234--", b"\r\n------=_Part_0_1234--")


SHORTENED = {
    "one big attachment": lambda: simple("files", [("a.bin", noise(600_000), "application/pdf")]),
    "one big attachment, LF line ends": lambda: lf(
        simple("files", [("a.bin", noise(600_000), "application/octet-stream")])
    ),
    "a big marked spreadsheet beside a small one": lambda: simple(
        "two files",
        [
            ("ACME_見積書.xlsx", xlsx(["ACME", CARD]) + noise(0), "application/vnd.ms-excel"),
            ("big.zip", plain_zip({"GLOBEX.txt": noise(500_000)}), "application/zip"),
        ],
    ),
    "a forwarded message carrying a big file": lambda: forwarded(
        simple("inner", [("inner.bin", noise(500_000), "application/octet-stream")])
    ),
    "a forwarded message carrying a big file, LF line ends": lambda: lf(
        forwarded(simple("inner", [("inner.bin", noise(500_000), "application/octet-stream")]))
    ),
    "a big base64 text body with a card number": big_text_body,
    "nested alternative and related parts with a big spreadsheet": lambda: (
        html_inline_image_and_xlsx(f"<p>{CARD}</p>", noise(300_000), "表.xlsx", xlsx(["x"]))
    ),
    "base64 with broken padding": broken_padding,
}


def full_facts(raw: bytes, policy: Policy) -> MessageFacts:
    return build_facts(Parsed(parse(raw)), ENVELOPE, policy.clients, policy.internal_domains)


def inspected_facts(raw: bytes, policy: Policy) -> MessageFacts:
    inspection = inspect(raw, ENVELOPE, policy, NOW)
    assert inspection.facts is not None, inspection.verdict
    return inspection.facts


@pytest.mark.parametrize("build", SHORTENED.values(), ids=SHORTENED.keys())
def test_large_message_facts_equal_the_whole_parse(
    build: Callable[[], bytes], book_policy: Policy
) -> None:
    raw = build()
    assert len(raw) >= LEAN_BYTES
    assert parse_message(raw).shortened, "the long bodies were not kept out of the parse"
    assert inspected_facts(raw, book_policy) == full_facts(raw, book_policy)


def test_a_card_number_in_a_shortened_text_body_is_found(book_policy: Policy) -> None:
    facts = inspected_facts(big_text_body(), book_policy)
    assert [f.kind for f in facts.body_pii] == ["credit_card"]


def test_a_forwarded_message_size_counts_its_shortened_bodies(book_policy: Policy) -> None:
    inner = simple("inner", [("inner.bin", noise(500_000), "application/octet-stream")])
    facts = inspected_facts(forwarded(inner), book_policy)
    eml = next(a for a in facts.attachments if a.name == "forwarded.eml")
    assert eml.size == len(inner)


UNSHORTENED = {
    "a big 8-bit text body": lambda: mixed("x" * 400_000, []).replace(b"base64", b"8bit"),
    "a big body with a line that is not base64": lambda: mixed(
        "files", [part(noise(300_000), "application/octet-stream").replace("AB", "A-B", 1)]
    ),
    "a multipart whose boundary is never used": lambda: mixed(
        "files", [attachment("a.bin", noise(300_000))]
    ).replace(b'boundary="----=_Part_0_1234"', b'boundary="unused"'),
}


@pytest.mark.parametrize("build", UNSHORTENED.values(), ids=UNSHORTENED.keys())
def test_what_the_ranges_cannot_vouch_for_is_parsed_whole(
    build: Callable[[], bytes], book_policy: Policy
) -> None:
    raw = build()
    assert len(raw) >= LEAN_BYTES
    assert parse_message(raw).shortened == {}
    assert inspected_facts(raw, book_policy) == full_facts(raw, book_policy)


def test_a_small_message_is_parsed_whole() -> None:
    raw = simple("files", [("a.bin", os.urandom(10_000), "application/octet-stream")])
    assert parse_message(raw).shortened == {}
