"""The single entry point the gateway calls: raw bytes and envelope in, verdict out.

`inspect` never raises. Anything that goes wrong while building facts or evaluating
rules holds the message with rule `policy-error` (fail closed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from policies.envelope import Envelope
from policies.mime import parse, walk_attachments
from policies.verdict import Verdict


@dataclass(frozen=True, slots=True)
class AttachmentSummary:
    name: str | None
    content_type: str
    size: int


@dataclass(frozen=True, slots=True)
class Policy:
    """Compiled rules, the client book and the organisation's internal domains."""

    internal_domains: tuple[str, ...] = ()
    rules: Sequence[object] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class Inspection:
    verdict: Verdict
    subject: str | None = None
    attachments: tuple[AttachmentSummary, ...] = ()


def inspect(
    raw: bytes,
    envelope: Envelope,
    policy: Policy,
    now: datetime,
    known_domains: frozenset[str] = frozenset(),
) -> Inspection:
    try:
        message = parse(raw)
        subject = message.get("subject")
        attachments = tuple(
            AttachmentSummary(
                a.filename,
                a.part.get_content_type(),
                len(a.part.get_payload(decode=True) or b""),
            )
            for a in walk_attachments(message)
        )
        return Inspection(Verdict.deliver(), str(subject) if subject is not None else None, attachments)
    except Exception as error:  # fail closed: hold, never deliver unprotected
        return Inspection(Verdict.policy_error(error))
