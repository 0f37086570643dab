"""The rule and client syntax operators write in gateway.toml, as pydantic models.

`[[rules]]` and `[[clients]]` tables arrive as dicts (TOML dotted keys `when.x = …`
become a nested `when` table). Everything an operator can get wrong fails here, at
start-up, with the key's name: an unknown key (with a "did you mean"), a bad regex
(with the rule and the pattern), a duplicate or non-kebab-case name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from policies.detectors.base import PiiKind
from policies.units import parse_duration, parse_size
from policies.verdict import Action

_KEBAB = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")


class ZipMethod(StrEnum):
    """How attachments for a client are encrypted at delivery."""

    AES256 = "aes256"  # WinZip AES-256: strong, but Windows Explorer cannot open it
    ZIPCRYPTO = "zipcrypto"  # PKWARE legacy: opens everywhere, weak (known-plaintext)


class RecipientScope(StrEnum):
    ANY_EXTERNAL = "any_external"
    ALL_EXTERNAL = "all_external"
    ALL_INTERNAL = "all_internal"


class PiiScope(StrEnum):
    BODY = "body"
    ATTACHMENTS = "attachments"
    ANY = "any"


def reject_unknown_keys(data: object, model: type[BaseModel], what: str) -> None:
    """Fail on a key the model does not know, suggesting the closest one."""
    if not isinstance(data, dict):
        return
    known = set(model.model_fields)
    for key in data:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
        listed = ", ".join(sorted(known))
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {listed})"
        raise ValueError(f"unknown {what} '{key}'{hint}")


def _as_list(value: object) -> object:
    """Let operators write a single glob or pattern where a list is expected."""
    return [value] if isinstance(value, str) else value


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_enum_values=False)


class When(_Spec):
    """The conditions of a rule. All given conditions must hold; none given matches all."""

    sender: tuple[str, ...] | None = None
    recipient_domain: tuple[str, ...] | None = None
    sender_group: tuple[str, ...] | None = None
    recipients: RecipientScope | None = None
    external_recipients_at_least: int | None = Field(default=None, ge=1)
    mixed_clients: bool | None = None
    has_attachments: bool | None = None
    attachment_name: tuple[str, ...] | None = None
    attachment_type: tuple[str, ...] | None = None
    attachment_size_over: int | None = None
    attachment_client_mismatch: bool | None = None
    encrypted_attachment: bool | None = None
    not_fully_inspected: bool | None = None
    pii: tuple[PiiKind, ...] | None = None
    pii_min: int | None = Field(default=None, ge=1)
    pii_in: PiiScope | None = None
    subject_matches: tuple[str, ...] | None = None
    body_matches: tuple[str, ...] | None = None
    first_time_recipient_domain: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_conditions(cls, data: object) -> object:
        reject_unknown_keys(data, cls, "condition")
        return data

    @field_validator(
        "sender",
        "recipient_domain",
        "sender_group",
        "attachment_name",
        "attachment_type",
        "subject_matches",
        "body_matches",
        "pii",
        mode="before",
    )
    @classmethod
    def _listify(cls, value: object) -> object:
        return _as_list(value)

    @field_validator("attachment_type")
    @classmethod
    def _lower_types(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else tuple(t.lower().lstrip(".") for t in value)

    @field_validator("attachment_size_over", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str | int) else value

    @model_validator(mode="after")
    def _pii_modifiers_need_pii(self) -> When:
        if self.pii is None and (self.pii_min is not None or self.pii_in is not None):
            raise ValueError("pii_min and pii_in refine 'pii': list the kinds in when.pii")
        return self

    def given(self) -> tuple[str, ...]:
        """The condition names the operator wrote, in declaration order."""
        return tuple(
            name
            for name in type(self).model_fields
            if getattr(self, name) is not None and name not in ("pii_min", "pii_in")
        )


class RuleSpec(_Spec):
    name: str
    description: str = ""
    when: When = Field(default_factory=When)
    action: Action | None = None
    reason: str = ""
    approvers: tuple[str, ...] = ()
    min_approvals: int = Field(default=1, ge=1)
    delay: int | None = None  # seconds
    encrypt: bool = False
    bcc: bool = False
    notify: str | None = None
    # The sender may end this rule's delay early (`POST …/release-now`), not only an
    # approver or admin: for rules whose delay is a chance to look again, not a check.
    sender_may_release: bool = False

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: object) -> object:
        reject_unknown_keys(data, cls, "rule key")
        return data

    @field_validator("name")
    @classmethod
    def _kebab(cls, value: str) -> str:
        if not _KEBAB.match(value):
            raise ValueError(f"rule name {value!r} must be kebab-case, e.g. 'personal-data'")
        return value

    @field_validator("approvers", mode="before")
    @classmethod
    def _approvers(cls, value: object) -> object:
        return _as_list(value)

    @field_validator("delay", mode="before")
    @classmethod
    def _delay(cls, value: object) -> object:
        if value is None or not isinstance(value, str | int | float):
            return value
        return int(parse_duration(value).total_seconds())

    @model_validator(mode="after")
    def _consistent(self) -> RuleSpec:
        if self.action is None and not (self.encrypt or self.bcc):
            raise ValueError(f"rule '{self.name}': give an action or a transform (encrypt, bcc)")
        if self.action is Action.DELAY and not self.delay:
            raise ValueError(f"rule '{self.name}': action 'delay' needs delay = '5m' or similar")
        if self.delay is not None and self.action is not Action.DELAY:
            raise ValueError(f"rule '{self.name}': delay is only used with action = 'delay'")
        if self.sender_may_release and self.action is not Action.DELAY:
            raise ValueError(
                f"rule '{self.name}': sender_may_release is only used with action = 'delay'"
            )
        for key in ("subject_matches", "body_matches"):
            for pattern in getattr(self.when, key) or ():
                _check_regex(self.name, key, pattern)
        return self

    @property
    def effective_action(self) -> Action:
        """A rule with only a transform (bcc = true) delivers, with that transform."""
        return self.action if self.action is not None else Action.DELIVER


def _check_regex(rule: str, key: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"rule '{rule}': bad regex {pattern!r} in when.{key}: {error}") from None


class ClientSpec(_Spec):
    name: str
    domains: tuple[str, ...] = Field(min_length=1)
    markers: tuple[str, ...] = ()
    zip_password: SecretStr | None = None
    zip_method: ZipMethod = ZipMethod.AES256

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: object) -> object:
        reject_unknown_keys(data, cls, "client key")
        return data

    @field_validator("domains", "markers", mode="before")
    @classmethod
    def _listify(cls, value: object) -> object:
        return _as_list(value)

    @field_validator("domains")
    @classmethod
    def _lower_domains(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(d.strip().lower().rstrip(".") for d in value)

    @field_validator("markers")
    @classmethod
    def _no_blank_markers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not m.strip() for m in value):
            raise ValueError("a marker cannot be blank")
        return value


def check_unique(names: Iterable[str], what: str) -> None:
    """Fail on a duplicate rule or client name (they appear in traces and audit logs)."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate {what} name '{name}'")
        seen.add(name)


def parse_rules(raw: Sequence[Mapping[str, Any] | RuleSpec]) -> tuple[RuleSpec, ...]:
    """Validate `[[rules]]` tables; raises pydantic.ValidationError or ValueError."""
    rules = tuple(r if isinstance(r, RuleSpec) else RuleSpec.model_validate(r) for r in raw)
    check_unique((r.name for r in rules), "rule")
    return rules


def parse_clients(raw: Sequence[Mapping[str, Any] | ClientSpec]) -> tuple[ClientSpec, ...]:
    clients = tuple(c if isinstance(c, ClientSpec) else ClientSpec.model_validate(c) for c in raw)
    check_unique((c.name for c in clients), "client")
    return clients
