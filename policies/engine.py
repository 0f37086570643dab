"""The single entry point the gateway calls: raw bytes and envelope in, verdict out.

`inspect` never raises. Anything that goes wrong while building facts or evaluating
rules holds the message with rule `policy-error`, and parts the walk never reached
(nested too deep, too many) hold it with rule `not-inspected` (fail closed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from policies.clients import ClientBook
from policies.combine import combine
from policies.config import ClientSpec, RuleSpec, parse_clients, parse_rules
from policies.envelope import Envelope
from policies.facts import AttachmentFacts, MessageFacts, build_facts
from policies.filetype import FileType
from policies.parsed import parse_message
from policies.rules import CompiledRule, evaluate
from policies.verdict import Verdict


@dataclass(frozen=True, slots=True)
class AttachmentSummary:
    name: str | None
    content_type: str
    size: int
    detected_type: FileType | None = None
    markers: tuple[str, ...] = ()  # names of the clients whose markers the file carries
    encrypted: bool = False
    inside_message: bool = False

    @classmethod
    def of(cls, facts: AttachmentFacts) -> AttachmentSummary:
        return cls(
            name=facts.name,
            content_type=facts.declared_type,
            size=facts.size,
            detected_type=facts.detected_type,
            markers=tuple(dict.fromkeys(m.client for m in facts.marks)),
            encrypted=facts.encrypted,
            inside_message=facts.inside_message,
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """Compiled rules, the client book and the organisation's internal domains."""

    internal_domains: tuple[str, ...] = ()
    rules: tuple[CompiledRule, ...] = ()
    clients: ClientBook = field(default_factory=ClientBook)

    @classmethod
    def compile(
        cls,
        rules: Sequence[RuleSpec | Mapping[str, Any]],
        clients: Sequence[ClientSpec | Mapping[str, Any]],
        internal_domains: Sequence[str],
    ) -> Policy:
        """Raises ValueError (or pydantic's ValidationError, a ValueError) naming the key."""
        return cls(
            internal_domains=tuple(d.strip().lower().rstrip(".") for d in internal_domains),
            rules=tuple(CompiledRule.compile(r) for r in parse_rules(rules)),
            clients=ClientBook(parse_clients(clients)),
        )

    def client_for(self, address: str) -> ClientSpec | None:
        """The client company an address belongs to (first matching domain glob)."""
        return self.clients.client_for(address)


@dataclass(frozen=True, slots=True)
class Inspection:
    verdict: Verdict
    subject: str | None = None
    attachments: tuple[AttachmentSummary, ...] = ()
    facts: MessageFacts | None = None


def inspect(
    raw: bytes,
    envelope: Envelope,
    policy: Policy,
    now: datetime,
    known_domains: frozenset[str] = frozenset(),
) -> Inspection:
    """Parse once, build the facts, evaluate every rule, combine.

    `now` is part of the contract so that time-based conditions stay pure; none of
    the current conditions reads it. `known_domains` are lower-case.
    """
    facts: MessageFacts | None = None
    try:
        facts = build_facts(parse_message(raw), envelope, policy.clients, policy.internal_domains)
        # Looked up, never copied: the set may hold 200,000 domains, and this runs for
        # every message. The caller gives them lower-case (the store keeps them so).
        traces = [evaluate(rule, facts, known_domains) for rule in policy.rules]
        verdict = combine(policy.rules, traces)
        if facts.unwalked:
            verdict = verdict.held_unwalked(facts.unwalked)
    except Exception as error:  # fail closed (RecursionError and MemoryError included)
        verdict = Verdict.policy_error(error)
    if facts is None:
        return Inspection(verdict)
    summaries = tuple(AttachmentSummary.of(a) for a in facts.attachments)
    return Inspection(verdict, facts.subject, summaries, facts)
