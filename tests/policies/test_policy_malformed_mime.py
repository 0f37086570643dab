"""Malformed MIME never makes `inspect` raise: the answer is a verdict, or a
`policy-error` hold. Truncated boundaries, bad encodings, thousands of parts and deep
nesting are what broken clients and attackers send."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messages import CRLF, headers, simple, xlsx
from policy_samples import CLIENTS, ISSUE_RULES, NOW

from policies.engine import Policy, inspect
from policies.envelope import Envelope
from policies.verdict import NOT_INSPECTED, POLICY_ERROR, Action

POLICY = Policy.compile(ISSUE_RULES, CLIENTS, ["corp.example"])
ENVELOPE = Envelope(mail_from="t@corp.example", rcpt_tos=("a@beta.example",))

_PIECES = st.sampled_from(
    [
        "--b",
        "--b--",
        "--",
        "Content-Type: multipart/mixed; boundary=b",
        "Content-Type: message/rfc822",
        "Content-Type: text/plain; charset=x-unknown",
        "Content-Type: application/zip; name==?ISO-2022-JP?B?GyRCJSIbKEI=?=",
        "Content-Disposition: attachment; filename*0*=bogus''%ZZ%; filename*1=x",
        'Content-Disposition: attachment; filename="\x82\xa0.xlsx"',
        "Content-Transfer-Encoding: base64",
        "Content-Transfer-Encoding: quoted-printable",
        "UEsDBBQAAAAIAAAAIQA=",
        "=?utf-8?B?broken",
        "=E3=81",
        '\x1b$B$"',
        "\udcff",
        "",
        "Subject: =?iso-2022-jp?B?GyRCJDMbKEI?=",
        "4111 1111 1111 1111",
    ]
)


def _assert_verdict(raw: bytes) -> None:
    verdict = inspect(raw, ENVELOPE, POLICY, NOW).verdict
    assert verdict.action in Action
    if verdict.rule == POLICY_ERROR:
        assert verdict.action is Action.HOLD


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, max_size=60), st.binary(max_size=200))
def test_inspect_never_raises_on_garbled_mime(lines: list[str], noise: bytes) -> None:
    text = headers() + "Content-Type: multipart/mixed; boundary=b" + CRLF + CRLF + CRLF.join(lines)
    _assert_verdict(text.encode("utf-8", "surrogateescape") + noise)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=2000))
def test_inspect_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    _assert_verdict(raw)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=1, max_value=len(simple("x", [("a.xlsx", xlsx(["1"]), "x/y")]))))
def test_inspect_never_raises_on_a_truncated_message(cut: int) -> None:
    _assert_verdict(simple("x", [("a.xlsx", xlsx(["1"]), "x/y")])[:cut])


def test_ten_thousand_parts() -> None:
    parts = "".join(
        f'--b{CRLF}Content-Type: text/plain; name="{i}.txt"{CRLF}{CRLF}x{CRLF}'
        for i in range(10_000)
    )
    raw = (
        headers() + f"Content-Type: multipart/mixed; boundary=b{CRLF}{CRLF}{parts}--b--"
    ).encode()
    inspection = inspect(raw, ENVELOPE, POLICY, NOW)
    assert inspection.facts is not None
    assert inspection.facts.not_fully_inspected  # stopped at the part limit, and says so


def test_deep_nesting() -> None:
    depth = 500
    opening = "".join(
        f"Content-Type: multipart/mixed; boundary=b{i}{CRLF}{CRLF}--b{i}{CRLF}"
        for i in range(depth)
    )
    closing = "".join(f"{CRLF}--b{i}--" for i in reversed(range(depth)))
    raw = (
        headers() + opening + f"Content-Type: text/csv; name=deep.csv{CRLF}{CRLF}x" + closing
    ).encode()
    inspection = inspect(raw, ENVELOPE, POLICY, NOW)
    verdict = inspection.verdict
    assert verdict.rule == POLICY_ERROR or (
        inspection.facts is not None and inspection.facts.not_fully_inspected
    )


def test_nested_forwarded_messages() -> None:
    inner = simple("x", [("a.csv", b"1", "text/csv")])
    for _ in range(40):
        inner = (headers() + f"Content-Type: message/rfc822{CRLF}{CRLF}").encode() + inner
    _assert_verdict(inner)


def _buried(depth: int) -> bytes:
    """customers.csv wrapped in `depth` multipart/mixed levels."""
    out = [b"From: t@corp.example\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"]
    for level in range(depth):
        out.append(
            b'Content-Type: multipart/mixed; boundary="b%d"\r\n\r\n--b%d\r\n' % (level, level)
        )
    out.append(
        b'Content-Type: text/csv\r\nContent-Disposition: attachment; filename="customers.csv"'
        b"\r\n\r\nname,phone\r\n"
    )
    out.extend(b"--b%d--\r\n" % level for level in reversed(range(depth)))
    return b"".join(out)


def test_an_attachment_buried_deeper_than_the_walk_is_held_not_delivered() -> None:
    # The walk stops at 20 levels: what lies deeper was seen by no rule. A verdict
    # weaker than a hold becomes one (fail closed); what the rules asked for stays.
    rules = [
        {"name": "customer-file", "when": {"attachment_name": ["*customer*"]}, "action": "hold"},
        {
            "name": "zip-external",
            "when": {"recipients": "any_external"},
            "action": "deliver",
            "encrypt": True,
        },
    ]
    policy = Policy.compile(rules, CLIENTS, ["corp.example"])
    shallow = inspect(_buried(3), ENVELOPE, policy, NOW).verdict
    assert (shallow.action, shallow.rule) == (Action.HOLD, "customer-file")
    deep = inspect(_buried(25), ENVELOPE, policy, NOW).verdict
    assert (deep.action, deep.rule) == (Action.HOLD, NOT_INSPECTED)
    assert deep.encrypt  # released later, it still leaves protected
    assert "nested deeper than 20" in (deep.trace[-1].error or "")
