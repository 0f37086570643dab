"""Hidden recipients leave To/Cc; everything else stays byte for byte."""

from __future__ import annotations

import pytest

from policies.transforms.bcc import hide_recipients, split_addresses

EXTERNAL = {"a@client.example", "b@client.example", "c@other.example", "g1@client.example"}
BODY = b"\r\nBody line\r\nTo: not-a-header@client.example\r\n"


def _hide(address: str) -> bool:
    return address.lower() in EXTERNAL


def _message(*headers: str) -> bytes:
    return ("\r\n".join(["From: s@corp.example", *headers, "Subject: x"]) + "\r\n").encode(
        "latin-1") + BODY


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (["To: a@client.example, me@corp.example"], ["To: me@corp.example"]),
        (["To: a@client.example", "Cc: boss@corp.example"],
         ["To: undisclosed-recipients:;", "Cc: boss@corp.example"]),
        (["To: me@corp.example", "Cc: a@client.example,\r\n b@client.example"],
         ["To: me@corp.example"]),
        (['To: "Yamada, Taro" <A@Client.Example>, "Sato, Jiro" <sato@corp.example>'],
         ['To: "Sato, Jiro" <sato@corp.example>']),
        (["To: =?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <yamada@corp.example>,\r\n"
          " =?UTF-8?B?5L2Q6Jek?= <c@other.example>"],
         ["To: =?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <yamada@corp.example>"]),
        (["To: Team: g1@client.example, me@corp.example;, x@corp.example"],
         ["To: Team: me@corp.example;,\r\n x@corp.example"]),
        (["To: Team: g1@client.example;, x@corp.example"], ["To: x@corp.example"]),
        (["To: undisclosed-recipients:;", "Cc: a@client.example"],
         ["To: undisclosed-recipients:;"]),
        (["To: me@corp.example (a@client.example, comment)"],
         ["To: me@corp.example (a@client.example, comment)"]),
        (["To: \x8eR\x93c <a@client.example>, \x8d\xb2\x93\xa1 <s@corp.example>"],
         ["To: \x8d\xb2\x93\xa1 <s@corp.example>"]),
        (["To: a@client.example", "To: b@client.example"],
         ["To: undisclosed-recipients:;"]),
        (["Reply-To: a@client.example", "To: me@corp.example"],
         ["Reply-To: a@client.example", "To: me@corp.example"]),
    ],
    ids=["to-mixed", "to-emptied", "cc-emptied-folded", "quoted-comma", "rfc2047-names",
         "group-keeps-rest", "group-emptied", "already-undisclosed", "comment-not-address",
         "raw-shift-jis-name", "two-to-fields", "reply-to-untouched"],
)
def test_hidden_recipients_are_removed(headers: list[str], expected: list[str]) -> None:
    assert hide_recipients(_message(*headers), hide=_hide) == _message(*expected)


def test_nothing_hidden_returns_the_same_bytes() -> None:
    raw = _message("To:  me@corp.example ,x@corp.example", "Cc: y@corp.example")
    assert hide_recipients(raw, hide=_hide) is raw


def test_body_and_other_headers_are_byte_identical() -> None:
    raw = _message("X-Long: " + "a" * 200, "To: a@client.example, me@corp.example",
                   "DKIM-Signature: v=1;\r\n\tb=abc")
    out = hide_recipients(raw, hide=_hide)
    assert out.endswith(BODY)
    assert b"X-Long: " + b"a" * 200 + b"\r\n" in out
    assert b"DKIM-Signature: v=1;\r\n\tb=abc\r\n" in out
    assert b"a@client.example" not in out[: out.index(BODY)]


def test_splitting_keeps_text_as_written() -> None:
    assert split_addresses(' "A, B" <a@x>, (c, d) e@x ,') == ['"A, B" <a@x>', "(c, d) e@x"]
