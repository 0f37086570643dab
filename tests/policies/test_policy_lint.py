"""Warnings for a config that works but probably is not what was meant."""

from __future__ import annotations

from policy_samples import CLIENTS, ISSUE_RULES

from policies.config import parse_clients, parse_rules
from policies.lint import lint


def test_issue_config_warns_only_about_zipcrypto_when_groups_exist() -> None:
    warnings = lint(parse_rules(ISSUE_RULES), parse_clients(CLIENTS), {"compliance"})
    assert warnings == [
        "client 'beta': zip_method 'zipcrypto' is weak (known-plaintext attacks); "
        "use it only for recipients who cannot open AES"]


def test_approver_group_nobody_belongs_to() -> None:
    warnings = lint(parse_rules(ISSUE_RULES), [], set())
    assert any("group 'compliance' has no members" in w for w in warnings)


def test_overlapping_client_domains_and_shared_markers() -> None:
    clients = parse_clients([
        {"name": "a", "domains": ["*.example"], "markers": ["ACME"]},
        {"name": "b", "domains": ["b.example"], "markers": ["ａｃｍｅ"]},
    ])
    warnings = lint([], clients, set())
    assert any("overlap on domain" in w and "'a' (listed first) wins" in w for w in warnings)
    assert any("belongs to both 'a' and 'b'" in w for w in warnings)


def test_approvers_on_a_rule_that_never_holds() -> None:
    rules = parse_rules([{"name": "d", "action": "delay", "delay": "1m", "approvers": ["x"]}])
    assert any("only matter for action 'hold'" in w for w in lint(rules, [], set()))
