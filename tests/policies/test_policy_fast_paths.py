"""The shortcuts of inspection give exactly what the full path gives.

Inspection shares parsed headers between reads and between messages, and shares rule
traces between messages with the same outcomes. Each test here holds a shortcut to the
path without it: every header parsed anew on every read, every trace validated anew.
"""

from __future__ import annotations

import tomllib
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from messages import (
    CRLF,
    DOCX_TYPE,
    PNG,
    content_type_name_only,
    docx,
    encrypted_zip,
    forwarded,
    headers,
    html_inline_image_and_xlsx,
    outlook_iso2022jp,
    pdf,
    plain,
    plain_zip,
    pptx,
    simple,
    swaks_shift_jis,
    thunderbird_rfc2231,
    xlsx,
)
from policy_samples import CLIENTS, ISSUE_RULES, NOW

from policies import mime, rules
from policies.combine import combine
from policies.conditions import CONDITIONS, Context
from policies.engine import Policy, inspect
from policies.envelope import Envelope
from policies.facts import MessageFacts, build_facts, subject_of
from policies.header_cache import MAX_HEADER_CHARS, InspectionPolicy, SharedHeaders
from policies.mime import INSPECTION_POLICY, SMTP_POLICY, parse
from policies.parsed import Parsed
from policies.rules import CompiledRule
from policies.verdict import ConditionTrace, RuleTrace, Verdict

SHIPPED = Path(__file__).resolve().parents[2] / "gateway.toml"


def shipped_examples() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every example rule and client of gateway.toml, uncommented."""
    examples = SHIPPED.read_text(encoding="utf-8").partition("## Client companies and rules.")[2]
    config = tomllib.loads("\n".join(
        line[2:] if line.startswith("# ") else line
        for line in examples.splitlines()[1:]
        if not line.startswith("##")
    ))
    return config["rules"], config["clients"]


def policies() -> list[Policy]:
    shipped_rules, shipped_clients = shipped_examples()
    return [
        Policy.compile(shipped_rules, shipped_clients, ["corp.example", "example.com"]),
        Policy.compile(ISSUE_RULES, CLIENTS, ["corp.example"]),
    ]


ENVELOPES = [
    Envelope(mail_from="taro@corp.example", rcpt_tos=("hanako@acme.example",)),
    Envelope(mail_from="taro@example.com", rcpt_tos=("jiro@corp.example", "a@example.com"),
             sender_user="taro", sender_groups=("sales",)),
    Envelope(mail_from="taro@corp.example",
             rcpt_tos=tuple(f"r{n}@{d}" for n, d in enumerate(
                 ["acme.example", "beta.example", "globex.example", "x.example", "y.example",
                  "corp.example"]))),
]
KNOWN = [frozenset(), frozenset({"acme.example", "beta.example"})]

JAPANESE = (
    "株式会社アクメ 山田様\r\nいつもお世話になっております。\r\n"
    "納品予定日：2024年1月25日（木） ご注文番号：ORD-2024-0115-0001\r\n"
    "TEL 03-1234-5678 携帯 ０９０ー１２３４ー５６７８ カード 4111 1111 1111 1111\r\n"
    "マイナンバー 1234-5678-9018 社外秘 internal only CONFIDENTIAL\r\n"
)
OCTETS = "application/octet-stream"
ADDRESSES = "\r\n".join(f"user{n}@customer{n}.example" for n in range(14))

CORPUS: list[bytes] = [
    plain("こんにちは"),
    plain(JAPANESE, subject="社外秘: 納品予定のご連絡"),
    plain(ADDRESSES, subject="リスト"),
    simple(JAPANESE, [("ACME_見積.xlsx", xlsx(["ACME 御中", "5555555555554444"]), OCTETS)]),
    simple("", [("customers.csv", f"name,tel\r\n{ADDRESSES}".encode(), "text/csv")]),
    simple("", [("ベータ商事.docx", docx(["ベータ商事 御中", "090-1234-5678"]), DOCX_TYPE)]),
    simple("", [("deck.pptx", pptx(["GLOBEX plan"]), OCTETS)]),
    simple("", [("a.zip", plain_zip({"顧客/一覧.xlsx": b"x"}, cp932_names=True), OCTETS)]),
    simple("", [("e.zip", encrypted_zip({"a.txt": b"x"}), "application/zip")]),
    simple("", [("p.pdf", pdf(encrypted=True), OCTETS), ("q.pdf", pdf(), "application/pdf")]),
    outlook_iso2022jp("ACME_見積.xlsx", xlsx(["x"])),
    thunderbird_rfc2231("顧客リスト.csv", b"a,b\r\n"),
    swaks_shift_jis("見積書.xlsx", xlsx(["ベータ商事"])),
    content_type_name_only("scan.pdf", pdf()),
    html_inline_image_and_xlsx("<p>ＡＣＭＥ <b>4111-1111-1111-1111</b></p>", PNG, "表.xlsx",
                               xlsx([])),
    forwarded(simple("inner", [("ACME.xlsx", xlsx(["ACME"]), OCTETS)])),
    (headers("=?iso-2022-jp?B?GyRCJDMbKEI?=") + "Content-Type: text/plain; charset=x-unknown"
     f"{CRLF}{CRLF}body{CRLF}").encode(),
]


def fresh_trace(rule: CompiledRule, facts: MessageFacts, known: frozenset[str]) -> RuleTrace:
    """A rule's trace as it was made before traces were shared: validated anew."""
    context = Context(facts, known, rule.subject_patterns, rule.body_patterns)
    conditions = []
    for name in rule.spec.when.given():
        matched, evidence = CONDITIONS[name](rule.spec.when, context)
        conditions.append(ConditionTrace(condition=name, matched=matched, evidence=evidence))
    return RuleTrace(rule=rule.spec.name, matched=all(c.matched for c in conditions),
                     action=rule.spec.effective_action, conditions=tuple(conditions))


def full_path(raw: bytes, envelope: Envelope, policy: Policy,
              known: frozenset[str]) -> tuple[Verdict, MessageFacts]:
    """Inspection without its shortcuts: SMTP_POLICY parses every header on each read."""
    facts = build_facts(Parsed(parse(raw, SMTP_POLICY)), envelope, policy.clients,
                        policy.internal_domains)
    verdict = combine(policy.rules, [fresh_trace(r, facts, known) for r in policy.rules])
    return (verdict.held_unwalked(facts.unwalked) if facts.unwalked else verdict), facts


def assert_same_as_full_path(raw: bytes, envelope: Envelope, policy: Policy,
                             known: frozenset[str]) -> None:
    expected, expected_facts = full_path(raw, envelope, policy, known)
    for _ in range(2):  # the second time, from the shared headers and traces
        inspection = inspect(raw, envelope, policy, NOW, known)
        assert inspection.verdict == expected
        assert inspection.verdict.model_dump(mode="json") == expected.model_dump(mode="json")
        assert inspection.facts == expected_facts


@pytest.mark.parametrize("policy", policies(), ids=["shipped", "issue"])
@pytest.mark.parametrize("raw", CORPUS, ids=range(len(CORPUS)))
def test_inspection_gives_the_full_paths_verdict_and_facts(raw: bytes, policy: Policy) -> None:
    for envelope in ENVELOPES:
        for known in KNOWN:
            assert_same_as_full_path(raw, envelope, policy, known)


def test_the_corpus_reaches_every_action_under_the_shipped_rules() -> None:
    shipped = policies()[0]
    actions = {inspect(raw, envelope, shipped, NOW).verdict.action
               for raw in CORPUS for envelope in ENVELOPES}
    assert {a.value for a in actions} == {"deliver", "delay", "hold", "refuse"}


_PIECES = st.sampled_from([
    "--b", "--b--", "", "Content-Type: multipart/mixed; boundary=b",
    "Content-Type: message/rfc822", "Content-Type: text/plain; charset=x-unknown",
    "Content-Type: text/plain; charset=\"ISO-2022-JP\"",
    "Content-Type: application/zip; name==?ISO-2022-JP?B?GyRCJSIbKEI=?=",
    "Content-Disposition: attachment; filename*0*=bogus''%ZZ%; filename*1=x",
    "Content-Disposition: attachment; filename*=UTF-8''%E9%A1%A7%E5%AE%A2.csv",
    'Content-Disposition: inline; filename="\x82\xa0.xlsx"', "Content-Type: text/html",
    "Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: quoted-printable",
    "UEsDBBQAAAAIAAAAIQA=", "=?utf-8?B?broken", "=E3=81", '\x1b$B$"', "\udcff",
    "Subject: =?iso-2022-jp?B?GyRCJDMbKEI?=", " folded continuation",
    "4111 1111 1111 1111", "ACME アクメ ＧＬＯＢＥＸ", "<b>090-1234-5678</b>",
])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES, max_size=30))
def test_broken_mime_gives_the_full_paths_verdict(pieces: list[str]) -> None:
    raw = (headers() + CRLF.join(pieces)).encode("utf-8", "surrogateescape")
    for policy in POLICIES:
        assert_same_as_full_path(raw, ENVELOPES[0], policy, frozenset())


POLICIES = policies()


# Shared headers ------------------------------------------------------------------

def header_view(header: str) -> tuple[object, ...]:
    """What readers of a parsed header see."""
    return (
        type(header).__name__, getattr(header, "name", None), str(header),
        [type(d).__name__ for d in getattr(header, "defects", ())],
        dict(getattr(header, "params", {})),
        *(getattr(header, a, None) for a in ("content_type", "maintype", "subtype", "cte",
                                              "content_disposition", "datetime")),
        [str(a) for a in getattr(header, "addresses", ())],
    )


_HEADER_NAMES = st.sampled_from([
    "Content-Type", "content-type", "Content-Disposition", "Content-Transfer-Encoding",
    "Subject", "From", "To", "Date", "Message-ID", "MIME-Version", "X-Other",
])
_HEADER_VALUES = st.lists(st.sampled_from([
    "text/plain", "multipart/mixed", "application/octet-stream", ";", " ", "=", '"', "'",
    "*", "%", "charset=utf-8", "name=", "filename*=UTF-8''%E8%A6%8B.xlsx", "filename*0*=",
    "boundary=\"b\"", "attachment", "inline", "=?utf-8?B?6KaL?=", "=?iso-2022-jp?B?GyRCJDMbKEI?=",
    "\r\n ", "\n\t", "\udc82\udca0", "見積", "base64", "8bit", "a@b.example", "<x@y>", ",",
    "Mon, 15 Jan 2024 10:00:00 +0900", "1.0", "(comment)", "\\", "\x00",
]), max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(_HEADER_NAMES, _HEADER_VALUES)
def test_a_shared_header_reads_as_a_freshly_parsed_one(name: str, value: str) -> None:
    try:
        fresh = header_view(SMTP_POLICY.header_fetch_parse(name, value))
    except Exception as error:  # the shared path must fail the same way, every time
        for _ in range(2):
            with pytest.raises(type(error)):
                INSPECTION_POLICY.header_fetch_parse(name, value)
        return
    for _ in range(2):
        assert header_view(INSPECTION_POLICY.header_fetch_parse(name, value)) == fresh


def test_headers_are_shared_up_to_a_length() -> None:
    short = "text/plain; charset=utf-8"
    fetch = INSPECTION_POLICY.header_fetch_parse
    assert fetch("Content-Type", short) is fetch("Content-Type", short)
    long = "text/plain; " + "; ".join(f"p{n}=v" for n in range(MAX_HEADER_CHARS // 4))
    assert len(long) > MAX_HEADER_CHARS
    assert fetch("Content-Type", long) is not fetch("Content-Type", long)
    assert fetch("Content-Type", long) == fetch("Content-Type", long)


def test_shared_headers_hold_a_bounded_number_of_characters() -> None:
    shared = SharedHeaders(max_chars=200)
    policy = InspectionPolicy(linesep="\r\n", refold_source="none", shared=shared)
    assert policy.shared is shared
    common = "text/plain; charset=utf-8"
    first = policy.header_fetch_parse("Content-Type", common)
    for n in range(100):
        boundary = f'multipart/mixed; boundary="----=_Part_{n}_1700000000000"'
        assert policy.header_fetch_parse("Content-Type", boundary).params["boundary"]
        assert policy.header_fetch_parse("Content-Type", common) is first  # read each time
        assert shared._chars <= 200 and shared._chars == sum(len(k[2]) for k in shared._held)
    assert len(shared) < 10


def test_a_header_that_fails_to_parse_fails_on_every_read() -> None:
    shared = SharedHeaders()

    def broken(name: str, value: str) -> str:
        raise ValueError("unparseable")

    for _ in range(2):
        with pytest.raises(ValueError):
            shared.parsed(broken, "Content-Type", "x/y")
    assert len(shared) == 0


def test_inspection_policy_is_smtp_policy_apart_from_sharing() -> None:
    for setting in ("linesep", "refold_source", "cte_type", "max_line_length", "mangle_from_",
                    "raise_on_defect", "utf8", "message_factory", "content_manager"):
        assert getattr(INSPECTION_POLICY, setting) == getattr(SMTP_POLICY, setting), setting
    raw = CORPUS[10]
    assert parse(raw, INSPECTION_POLICY).as_bytes() == parse(raw).as_bytes() == raw


# Shared traces -------------------------------------------------------------------

def test_the_same_outcomes_share_one_trace() -> None:
    policy = POLICIES[0]
    first = inspect(CORPUS[0], ENVELOPES[0], policy, NOW).verdict
    again = inspect(CORPUS[0], ENVELOPES[0], policy, NOW).verdict
    assert all(a is b for a, b in zip(first.trace, again.trace, strict=True))


def test_a_trace_is_shared_only_by_the_same_rule_action_and_outcomes() -> None:
    outcomes = (("pii", False, ("0 found",)),)
    hold = rules._trace("r", rules.Action.HOLD, outcomes)
    assert rules._trace("r", rules.Action.REFUSE, outcomes).action is rules.Action.REFUSE
    assert rules._trace("s", rules.Action.HOLD, outcomes).rule == "s"
    assert rules._trace("r", rules.Action.HOLD, (("pii", False, ("1 found",)),)) != hold
    assert rules._trace("r", rules.Action.HOLD, outcomes) is hold


def test_shared_traces_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "MAX_SHARED_TRACES", 8)
    monkeypatch.setattr(rules, "_SHARED", {})
    for n in range(50):
        trace = rules._trace("r", rules.Action.HOLD, (("sender", True, (f"a{n}@x",)),))
        assert trace.conditions[0].evidence == (f"a{n}@x",)
        assert len(rules._SHARED) <= 8


def test_a_header_read_after_parsing_is_still_parsed_from_the_message() -> None:
    # The cache is keyed by the raw value: two messages with different Content-Types
    # never see each other's, even when read alternately.
    one, two = parse(plain("a"), INSPECTION_POLICY), parse(CORPUS[10], INSPECTION_POLICY)
    for _ in range(2):
        assert one.get_content_type() == "text/plain"
        assert two.get_content_type() == "multipart/mixed"
    assert mime.filename_of(two.get_payload()[1]) == "ACME_見積.xlsx"


# Plain subjects ------------------------------------------------------------------

def subject_through_the_parser(message: Message) -> str | None:
    """`subject_of` as it was: every subject through the header parser."""
    try:
        subject = message.get("subject")
    except (ValueError, LookupError, TypeError, AttributeError, IndexError):
        subject = next((str(v) for k, v in message.raw_items() if k.lower() == "subject"), None)
    return None if subject is None else str(subject)


_SUBJECT_LINE = st.lists(st.sampled_from([
    b"Re:", b" ", b"\t", b"report", b"=", b"?", b"=?", b"?=", b"=?utf-8?B?6KaL?=",
    b"=?iso-2022-jp?Q?abc?=", b"\x1b$B", b"\x82\xa0", b"\xe8\xa6\x8b", b"(v3)", b"\x00",
    b"\x0b", b"\x0c", b"\x7f", b"'", b'"', b",", b";", b":",
]), max_size=10).map(b"".join)


@settings(max_examples=500, deadline=None)
@given(_SUBJECT_LINE, st.lists(st.tuples(st.sampled_from([b" ", b"\t", b"  "]), _SUBJECT_LINE),
                               max_size=3))
def test_a_plain_subject_reads_as_the_header_parser_reads_it(
    first: bytes, folds: list[tuple[bytes, bytes]]
) -> None:
    value = first + b"".join(b"\r\n" + ws + line for ws, line in folds)
    raw = b"From: a@b.example\r\nSubject:" + value + b"\r\nSubject: second\r\n\r\nbody\r\n"
    expected = subject_through_the_parser(parse(raw, SMTP_POLICY))
    assert subject_of(parse(raw, INSPECTION_POLICY)) == expected
    assert subject_of(parse(raw, SMTP_POLICY)) == expected


def test_a_message_without_subject_has_none() -> None:
    assert subject_of(parse(b"From: a@b.example\r\n\r\nbody\r\n")) is None
