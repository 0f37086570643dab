"""Combining many matched rules into one verdict, explaining it, and failing closed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from messages import outlook_iso2022jp, plain, simple, xlsx
from policy_samples import CLIENTS, ISSUE_RULES, NOW

from policies.engine import Policy, inspect
from policies.envelope import Envelope
from policies.report import as_json, as_text
from policies.verdict import POLICY_ERROR, Action, Verdict

TO_BETA = Envelope(mail_from="taro@corp.example", rcpt_tos=("a@beta.example",))


def rule(name: str, action: str | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "when": {}, **extra}
    if action:
        spec["action"] = action
    return spec


COMBINING: list[tuple[str, list[dict[str, Any]], dict[str, Any]]] = [
    ("nothing matches: deliver", [], {"action": Action.DELIVER, "rule": None}),
    ("refuse beats hold", [rule("h", "hold"), rule("r", "refuse", reason="no")],
     {"action": Action.REFUSE, "rule": "r", "reason": "no"}),
    ("hold beats delay", [rule("d", "delay", delay="1m"), rule("h", "hold")],
     {"action": Action.HOLD, "rule": "h", "delay_seconds": None}),
    ("delay beats deliver", [rule("b", bcc=True), rule("d", "delay", delay="1m")],
     {"action": Action.DELAY, "rule": "d", "delay_seconds": 60, "bcc": True}),
    ("first strongest rule names the verdict", [rule("h1", "hold"), rule("h2", "hold")],
     {"rule": "h1"}),
    ("longest delay wins", [rule("d1", "delay", delay="5m"), rule("d2", "delay", delay="1h")],
     {"delay_seconds": 3600, "rule": "d1"}),
    ("transforms accumulate", [rule("e", "delay", delay="1m", encrypt=True), rule("b", bcc=True)],
     {"encrypt": True, "bcc": True}),
    ("approvers accumulate, in order, once",
     [rule("a", "hold", approvers=["group:compliance", "boss"]),
      rule("b", "hold", approvers=["group:legal", "boss"])],
     {"approvers": ("group:compliance", "boss", "group:legal")}),
    ("min_approvals is the largest", [rule("a", "hold", min_approvals=2), rule("b", "hold")],
     {"min_approvals": 2}),
    ("bcc only is deliver", [rule("b", bcc=True)], {"action": Action.DELIVER, "bcc": True}),
    ("reason falls back to description", [rule("h", "hold", description="Held for review")],
     {"reason": "Held for review"}),
    ("notify of the winner", [rule("d", "delay", delay="1m", notify="approvers"),
                              rule("h", "hold", notify="sender")], {"notify": "sender"}),
    ("sender may release a delay its rule allows",
     [rule("d", "delay", delay="5m", sender_may_release=True), rule("b", bcc=True)],
     {"action": Action.DELAY, "sender_may_release": True}),
    ("sender may not release by default", [rule("d", "delay", delay="5m")],
     {"sender_may_release": False}),
    ("every delaying rule must allow the sender",
     [rule("d1", "delay", delay="5m", sender_may_release=True),
      rule("d2", "delay", delay="1m")],
     {"action": Action.DELAY, "delay_seconds": 300, "sender_may_release": False}),
    ("all delaying rules allow it", [rule("d1", "delay", delay="5m", sender_may_release=True),
                                     rule("d2", "delay", delay="1h", sender_may_release=True)],
     {"delay_seconds": 3600, "sender_may_release": True}),
    ("never for held mail", [rule("d", "delay", delay="5m", sender_may_release=True),
                             rule("h", "hold")],
     {"action": Action.HOLD, "sender_may_release": False}),
]


@pytest.mark.parametrize(("rules", "expected"), [c[1:] for c in COMBINING],
                         ids=[c[0] for c in COMBINING])
def test_combining(rules: list[dict[str, Any]], expected: dict[str, Any]) -> None:
    verdict = inspect(plain("hi"), TO_BETA, Policy.compile(rules, [], []), NOW).verdict
    assert {k: getattr(verdict, k) for k in expected} == expected
    assert [t.rule for t in verdict.trace] == [r["name"] for r in rules]


def test_unmatched_rule_is_traced_but_does_not_act() -> None:
    rules = [{"name": "never", "when": {"has_attachments": True}, "action": "refuse"}]
    verdict = inspect(plain("hi"), TO_BETA, Policy.compile(rules, [], []), NOW).verdict
    assert verdict.action is Action.DELIVER
    assert verdict.trace[0].matched is False
    assert verdict.trace[0].conditions[0].evidence == ()


@pytest.mark.parametrize(
    ("raw", "envelope", "action", "rule"),
    [
        (outlook_iso2022jp("ACME_見積.xlsx", xlsx([])), TO_BETA, Action.REFUSE,
         "wrong-client-attachment"),
        (plain("カード ４１１１ １１１１ １１１１ １１１１"), TO_BETA, Action.HOLD,
         "personal-data"),
        (simple("", [("a.csv", b"1", "text/csv")]), TO_BETA, Action.DELAY, "external-attachments"),
        (plain("hi"), Envelope(mail_from="t@corp.example", rcpt_tos=("x@corp.example",)),
         Action.DELIVER, None),
    ],
)
def test_issue_ruleset(raw: bytes, envelope: Envelope, action: Action, rule: str | None,
                       issue_policy: Policy) -> None:
    verdict = inspect(raw, envelope, issue_policy, NOW).verdict
    assert (verdict.action, verdict.rule) == (action, rule)


def test_empty_policy_delivers_everything() -> None:
    inspection = inspect(outlook_iso2022jp("a.xlsx", xlsx([])), TO_BETA, Policy(), NOW)
    assert inspection.verdict == Verdict(action=Action.DELIVER)
    assert inspection.subject == "お見積りの件"
    assert [a.name for a in inspection.attachments] == ["a.xlsx"]


def test_exception_while_building_facts_holds_as_policy_error(
    issue_policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("policies.engine.build_facts", broken)  # the fault to inject
    verdict = inspect(plain("hi"), TO_BETA, issue_policy, NOW).verdict
    assert (verdict.action, verdict.rule) == (Action.HOLD, POLICY_ERROR)
    assert verdict.trace[0].error is not None and "RuntimeError" in verdict.trace[0].error


def test_exception_in_a_condition_holds_as_policy_error(
    issue_policy: Policy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from policies import conditions

    def broken(*args: object) -> None:
        raise ValueError("bad")

    monkeypatch.setitem(conditions.CONDITIONS, "pii", broken)
    verdict = inspect(plain("hi"), TO_BETA, issue_policy, NOW).verdict
    assert verdict.rule == POLICY_ERROR


@pytest.mark.parametrize(
    ("reason", "description", "expected"),
    [
        ("添付ファイルが宛先と異なる取引先のものです / attachment belongs to another client", "",
         "r: attachment belongs to another client"),
        ("取引先が違います", "Attachment for another client", "r: Attachment for another client"),
        ("取引先が違います", "説明", "r: message refused by policy"),
        ("line one\r\nline two", "", "r: line one line two"),
    ],
)
def test_smtp_reason_is_one_ascii_line(reason: str, description: str, expected: str) -> None:
    verdict = Verdict(action=Action.REFUSE, rule="r", reason=reason, description=description)
    assert verdict.smtp_reason() == expected
    assert verdict.smtp_reason().isascii()


def test_full_values_never_reach_trace_or_report(issue_policy: Policy) -> None:
    body = "card 4111111111111111, my number 123456789018"
    raw = simple(body, [("c.xlsx", xlsx(["5555555555554444"]), "application/octet-stream")])
    inspection = inspect(raw, TO_BETA, issue_policy, NOW)
    dumped = (inspection.verdict.model_dump_json() + json.dumps(as_json(inspection),
              ensure_ascii=False) + as_text(inspection))
    for value in ("4111111111111111", "123456789018", "5555555555554444", "1111 1111"):
        assert value not in dumped
    assert "4111 **** **** 1111" in dumped
    assert "5555 **** **** 4444" in dumped


def test_report_shows_verdict_rules_and_facts(issue_policy: Policy) -> None:
    inspection = inspect(outlook_iso2022jp("ACME_見積.xlsx", xlsx([])), TO_BETA, issue_policy, NOW)
    text = as_text(inspection)
    assert text.startswith("verdict: refuse (wrong-client-attachment)")
    assert "marker 'ACME' of acme in name" in text
    data = as_json(inspection)
    assert data["verdict"]["smtp_reason"] == (
        "wrong-client-attachment: attachment belongs to another client")
    assert data["facts"]["attachments"][0]["detected_type"] == "xlsx"
    assert [r["rule"] for r in data["rules"]] == [r["name"] for r in ISSUE_RULES]
    json.dumps(data)  # serialisable as is


def test_report_of_a_policy_error_has_no_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("policies.engine.build_facts", broken)
    inspection = inspect(plain("hi"), TO_BETA, Policy(), NOW)
    assert as_json(inspection)["facts"] is None
    assert as_text(inspection).startswith("verdict: hold (policy-error)")


def test_client_book_is_reachable_from_the_policy() -> None:
    policy = Policy.compile([], CLIENTS, [])
    assert [c.name for c in policy.clients] == ["acme", "beta"]
