"""Each `when.*` condition as a table: (condition, message, envelope) → matched or not."""

from __future__ import annotations

from typing import Any

import pytest
from messages import (
    encrypted_zip,
    forwarded,
    outlook_iso2022jp,
    pdf,
    plain,
    plain_zip,
    simple,
    swaks_shift_jis,
    thunderbird_rfc2231,
    xlsx,
)
from policy_samples import CLIENTS, NOW

from policies.engine import Policy, inspect
from policies.envelope import Envelope
from policies.verdict import Action

TEXT = plain("こんにちは")
CSV = simple("", [("list.csv", b"a,b\n", "text/csv")])
ACME_XLSX = outlook_iso2022jp("ACME_見積.xlsx", xlsx(["x"]))
BETA_IN_ACME_FILE = simple("", [("ACME.xlsx", xlsx(["ベータ商事"]), "application/octet-stream")])


def env(*rcpts: str, sender: str = "taro@corp.example", groups: tuple[str, ...] = ()) -> Envelope:
    return Envelope(mail_from=sender, rcpt_tos=rcpts, sender_user="taro", sender_groups=groups)


EXT = env("hanako@acme.example")
INT = env("jiro@corp.example")


def holds(when: dict[str, Any], raw: bytes, envelope: Envelope,
          known: frozenset[str] = frozenset()) -> bool:
    policy = Policy.compile([{"name": "r", "when": when, "action": "hold"}], CLIENTS,
                            ["corp.example", "*.corp.example"])
    verdict = inspect(raw, envelope, policy, NOW, known).verdict
    assert verdict.rule != "policy-error", verdict.trace
    return verdict.action is Action.HOLD


CASES: list[tuple[str, dict[str, Any], bytes, Envelope, bool]] = [
    ("sender glob", {"sender": ["*@corp.example"]}, TEXT, EXT, True),
    ("sender glob is case-insensitive", {"sender": ["TARO@*"]}, TEXT, EXT, True),
    ("sender other", {"sender": ["boss@corp.example"]}, TEXT, EXT, False),
    ("recipient_domain", {"recipient_domain": ["*.example"]}, TEXT, EXT, True),
    ("recipient_domain none", {"recipient_domain": ["gmail.com"]}, TEXT, EXT, False),
    ("sender_group", {"sender_group": ["sales"]}, TEXT, env("a@x.example", groups=("sales",)),
     True),
    ("sender_group other", {"sender_group": ["hr"]}, TEXT, env("a@x.example", groups=("sales",)),
     False),
    ("any_external", {"recipients": "any_external"}, TEXT, env("a@corp.example", "b@x.example"),
     True),
    ("any_external, all internal", {"recipients": "any_external"}, TEXT,
     env("a@corp.example", "b@dev.corp.example"), False),
    ("all_external", {"recipients": "all_external"}, TEXT, env("a@y.example", "b@x.example"), True),
    ("all_external, one internal", {"recipients": "all_external"}, TEXT,
     env("a@corp.example", "b@x.example"), False),
    ("all_internal", {"recipients": "all_internal"}, TEXT, INT, True),
    ("all_internal, one external", {"recipients": "all_internal"}, TEXT,
     env("a@corp.example", "b@x.example"), False),
    ("5 external", {"external_recipients_at_least": 5}, TEXT,
     env(*(f"u{i}@x.example" for i in range(5)), "me@corp.example"), True),
    ("4 external", {"external_recipients_at_least": 5}, TEXT,
     env(*(f"u{i}@x.example" for i in range(4)), "me@corp.example"), False),
    ("mixed_clients", {"mixed_clients": True}, TEXT, env("a@acme.example", "b@beta.example"), True),
    ("one client", {"mixed_clients": True}, TEXT, env("a@acme.example", "b@x.acme.example"), False),
    ("client and unknown", {"mixed_clients": True}, TEXT, env("a@acme.example", "b@x.example"),
     False),
    ("not mixed", {"mixed_clients": False}, TEXT, env("a@acme.example"), True),
    ("has_attachments", {"has_attachments": True}, CSV, EXT, True),
    ("no attachments", {"has_attachments": True}, TEXT, EXT, False),
    ("has_attachments = false", {"has_attachments": False}, TEXT, EXT, True),
    ("attachment in forwarded mail", {"attachment_name": ["*.csv"]},
     forwarded(simple("", [("x.csv", b"1", "text/csv")])), EXT, True),
    ("attachment_name", {"attachment_name": ["*.CSV"]}, CSV, EXT, True),
    ("attachment_name full width", {"attachment_name": ["*見積*"]},
     swaks_shift_jis("御見積.pdf", pdf()), EXT, True),
    ("attachment_name inside zip", {"attachment_name": ["*.xlsx"]},
     simple("", [("a.zip", plain_zip({"d/顧客.xlsx": b"x"}), "application/zip")]), EXT, True),
    ("attachment_name other", {"attachment_name": ["*.exe"]}, CSV, EXT, False),
    ("attachment_type by magic", {"attachment_type": ["xlsx"]},
     simple("", [("harmless.txt", xlsx([]), "text/plain")]), EXT, True),
    ("attachment_type by extension", {"attachment_type": ["csv"]}, CSV, EXT, True),
    ("attachment_type other", {"attachment_type": ["pdf"]}, CSV, EXT, False),
    ("attachment_size_over", {"attachment_size_over": "3B"}, CSV, EXT, True),
    ("attachment_size_under", {"attachment_size_over": "1KB"}, CSV, EXT, False),
    ("mismatch: ACME file to beta", {"attachment_client_mismatch": True}, ACME_XLSX,
     env("a@beta.example"), True),
    ("mismatch: ACME file to unknown company", {"attachment_client_mismatch": True}, ACME_XLSX,
     env("a@other.example"), True),
    ("mismatch: ACME file to ACME and beta", {"attachment_client_mismatch": True}, ACME_XLSX,
     env("a@acme.example", "b@beta.example"), True),
    ("mismatch: markers of two clients", {"attachment_client_mismatch": True}, BETA_IN_ACME_FILE,
     env("a@acme.example"), True),
    ("match: ACME file to ACME", {"attachment_client_mismatch": True}, ACME_XLSX,
     env("a@acme.example", "b@corp.example"), False),
    ("match: ACME file internal only", {"attachment_client_mismatch": True}, ACME_XLSX, INT, False),
    ("match: unmarked file", {"attachment_client_mismatch": True}, CSV, env("a@beta.example"),
     False),
    ("mismatch by text in RFC 2231 csv", {"attachment_client_mismatch": True},
     thunderbird_rfc2231("list.csv", "アクメ様\n".encode()), env("a@beta.example"), True),
    ("encrypted zip", {"encrypted_attachment": True},
     simple("", [("a.zip", encrypted_zip({"a": b"1"}), "application/zip")]), EXT, True),
    ("encrypted pdf", {"encrypted_attachment": True},
     simple("", [("a.pdf", pdf(encrypted=True), "application/pdf")]), EXT, True),
    ("plain pdf", {"encrypted_attachment": True}, simple("", [("a.pdf", pdf(), "application/pdf")]),
     EXT, False),
    ("unencrypted", {"encrypted_attachment": False}, CSV, EXT, True),
    ("not fully inspected", {"not_fully_inspected": True},
     simple("", [("a.7z", b"7z\xbc\xaf\x27\x1c" + b"\x00" * 20, "application/x-7z")]), EXT, True),
    ("fully inspected", {"not_fully_inspected": True}, CSV, EXT, False),
    ("pii in body", {"pii": ["credit_card"]}, plain("4111 1111 1111 1111"), EXT, True),
    ("pii other kind", {"pii": ["my_number"]}, plain("4111 1111 1111 1111"), EXT, False),
    ("pii_min not reached", {"pii": ["credit_card"], "pii_min": 2}, plain("4111111111111111"), EXT,
     False),
    ("pii_min reached", {"pii": ["credit_card", "my_number"], "pii_min": 2},
     plain("4111111111111111 / 123456789018"), EXT, True),
    ("pii_in attachments, found in body", {"pii": ["credit_card"], "pii_in": "attachments"},
     plain("4111111111111111"), EXT, False),
    ("pii_in attachments", {"pii": ["my_number"], "pii_in": "attachments"},
     simple("", [("x.xlsx", xlsx(["123456789018"]), "application/octet-stream")]), EXT, True),
    ("pii_in body, found in file", {"pii": ["my_number"], "pii_in": "body"},
     simple("", [("x.xlsx", xlsx(["123456789018"]), "application/octet-stream")]), EXT, False),
    ("phone list", {"pii": ["phone_jp"]}, plain("090-1234-5678"), EXT, True),
    ("email list", {"pii": ["email_addresses"]},
     plain("\n".join(f"c{i}@x.example" for i in range(20))), EXT, True),
    ("subject_matches", {"subject_matches": ["見積"]}, ACME_XLSX, EXT, True),
    ("subject_matches full width", {"subject_matches": ["(?i)urgent"]}, plain("x", "ＵＲＧＥＮＴ"),
     EXT, True),
    ("subject no match", {"subject_matches": ["請求"]}, ACME_XLSX, EXT, False),
    ("body_matches", {"body_matches": ["社外秘"]}, plain("これは社外秘です"), EXT, True),
    ("body no match", {"body_matches": ["社外秘"]}, TEXT, EXT, False),
    ("first time domain", {"first_time_recipient_domain": True}, TEXT,
     env("a@acme.example", "b@new.example"), True),
    ("known domain", {"first_time_recipient_domain": True}, TEXT,
     env("a@acme.example", "b@corp.example"), False),
    ("all given conditions must hold", {"has_attachments": True, "recipients": "all_internal"},
     CSV, EXT, False),
    ("no conditions match everything", {}, TEXT, EXT, True),
]


@pytest.mark.parametrize(("when", "raw", "envelope", "expected"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_condition(when: dict[str, Any], raw: bytes, envelope: Envelope, expected: bool) -> None:
    assert holds(when, raw, envelope, frozenset({"acme.example"})) is expected


def test_every_condition_has_a_case() -> None:
    from policies.conditions import CONDITIONS

    covered = {key for _, when, *_ in CASES for key in when}
    assert set(CONDITIONS) <= covered


def test_trace_explains_the_mismatch_with_file_and_marker() -> None:
    policy = Policy.compile([{"name": "wrong-client", "when": {"attachment_client_mismatch": True},
                              "action": "refuse"}], CLIENTS, ["corp.example"])
    verdict = inspect(ACME_XLSX, env("a@beta.example"), policy, NOW).verdict
    (condition,) = verdict.trace[0].conditions
    assert condition.evidence == (
        "ACME_見積.xlsx: marker 'ACME' (name) is client acme, but a@beta.example is client beta",)


class _LookedUpOnly(frozenset[str]):
    """A known-domain set that may be looked up but not walked."""

    def __iter__(self) -> Any:
        raise AssertionError("the known-domain set was walked for one message")


def test_known_domains_are_looked_up_not_copied_per_message() -> None:
    # The gateway keeps up to 200,000 known domains; walking them for every message
    # costs ~20 ms each. A message to one new and one known domain needs two lookups.
    known = _LookedUpOnly(
        [*(f"d{i}.example" for i in range(200_000)), "acme.example", "corp.example"]
    )
    assert holds({"first_time_recipient_domain": True}, TEXT,
                 env("a@acme.example", "b@d7.example", "c@new.example"), known)
    assert not holds({"first_time_recipient_domain": True}, TEXT,
                     env("a@acme.example", "b@d7.example"), known)
