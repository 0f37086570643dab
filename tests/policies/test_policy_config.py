"""What operators write in gateway.toml: accepted when right, refused naming the key."""

from __future__ import annotations

from typing import Any

import pytest
from policy_samples import CLIENTS, ISSUE_RULES

from policies.config import ClientSpec, RuleSpec, ZipMethod
from policies.engine import Policy
from policies.verdict import Action


def test_issue_examples_compile() -> None:
    policy = Policy.compile(ISSUE_RULES, CLIENTS, ["corp.example"])
    assert [r.name for r in policy.rules] == [r["name"] for r in ISSUE_RULES]
    assert policy.rules[3].action is Action.DELIVER  # bcc only: deliver plus the transform
    assert policy.rules[2].spec.delay == 300


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "r", "when": {"pii_mn": 1, "pii": ["my_number"]}, "action": "hold"},
         "unknown condition 'pii_mn' (did you mean 'pii_min'?)"),
        ({"name": "r", "when": {"attachement_name": ["*.csv"]}, "action": "hold"},
         "did you mean 'attachment_name'?"),
        ({"name": "r", "actoin": "hold"}, "unknown rule key 'actoin' (did you mean 'action'?)"),
        ({"name": "r", "when": {"subject_matches": ["(unclosed"]}, "action": "hold"},
         "rule 'r': bad regex '(unclosed' in when.subject_matches"),
        ({"name": "Personal_Data", "action": "hold"}, "must be kebab-case"),
        ({"name": "r", "action": "explode"}, "'deliver', 'delay', 'hold' or 'refuse'"),
        ({"name": "r"}, "give an action or a transform"),
        ({"name": "r", "action": "delay"}, "needs delay"),
        ({"name": "r", "action": "hold", "delay": "5m"}, "only used with action = 'delay'"),
        ({"name": "r", "action": "delay", "delay": "soon"}, "not a duration"),
        ({"name": "r", "action": "hold", "sender_may_release": True},
         "sender_may_release is only used with action = 'delay'"),
        ({"name": "r", "when": {"recipients": "some_external"}, "action": "hold"},
         "'any_external', 'all_external' or 'all_internal'"),
        ({"name": "r", "when": {"pii": ["passport"]}, "action": "hold"}, "credit_card"),
        ({"name": "r", "when": {"pii_min": 2}, "action": "hold"}, "list the kinds in when.pii"),
        ({"name": "r", "when": {"attachment_size_over": "big"}, "action": "hold"}, "not a size"),
    ],
)
def test_bad_rule_fails_naming_the_key(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as error:
        Policy.compile([rule], [], [])
    assert message in str(error.value)


def test_duplicate_rule_names_fail() -> None:
    rule = {"name": "same", "action": "hold"}
    with pytest.raises(ValueError, match="duplicate rule name 'same'"):
        Policy.compile([rule, rule], [], [])


def test_duplicate_client_names_fail() -> None:
    with pytest.raises(ValueError, match="duplicate client name 'acme'"):
        Policy.compile([], [CLIENTS[0], CLIENTS[0]], [])


def test_single_values_are_accepted_where_lists_are_expected() -> None:
    spec = RuleSpec.model_validate({"name": "r", "when": {"attachment_type": ".XLSX",
                                                          "sender": "*@corp.example"},
                                    "action": "hold", "approvers": "group:compliance"})
    assert spec.when.attachment_type == ("xlsx",)
    assert spec.when.sender == ("*@corp.example",)
    assert spec.approvers == ("group:compliance",)


def test_sizes_are_parsed() -> None:
    spec = RuleSpec.model_validate({"name": "r", "when": {"attachment_size_over": "10MiB"},
                                    "action": "hold"})
    assert spec.when.attachment_size_over == 10 * 1024 * 1024


def test_client_defaults_and_secret() -> None:
    client = ClientSpec.model_validate(CLIENTS[1])
    assert client.zip_method is ZipMethod.ZIPCRYPTO
    assert "beta-pass" not in repr(client)
    assert client.zip_password is not None
    assert client.zip_password.get_secret_value() == "beta-pass"
    assert ClientSpec.model_validate(CLIENTS[0]).zip_method is ZipMethod.AES256


@pytest.mark.parametrize(
    ("client", "message"),
    [
        ({"name": "x", "domains": ["x.example"], "zip_method": "des"}, "'aes256' or 'zipcrypto'"),
        ({"name": "x", "domains": []}, "at least 1 item"),
        ({"name": "x", "domain": ["x.example"]}, "did you mean 'domains'?"),
        ({"name": "x", "domains": ["x.example"], "markers": [" "]}, "blank"),
    ],
)
def test_bad_client_fails_naming_the_key(client: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as error:
        Policy.compile([], [client], [])
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("address", "client"),
    [
        ("a@acme.example", "acme"),
        ("a@Sales.ACME.example", "acme"),
        ("<a@beta.example>", "beta"),
        ("a@notacme.example", None),
        ("a@acme.example.evil", None),
        ("a@corp.example", None),
    ],
)
def test_client_for_matches_domain_globs(address: str, client: str | None) -> None:
    policy = Policy.compile([], CLIENTS, ["corp.example"])
    found = policy.client_for(address)
    assert (found.name if found else None) == client
    assert len(policy.clients) == 2


def test_empty_policy_compiles_and_has_no_clients() -> None:
    policy = Policy()
    assert policy.client_for("a@acme.example") is None
    assert list(policy.clients) == []
