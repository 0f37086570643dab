"""The `when.*` conditions: each is a small function of the facts and the rule's value.

Every function returns whether the fact holds and the evidence that shows it. The
evidence names a file, a recipient, a marker, or a kind and count of personal data
with masked values; never a full value.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import assert_never

from policies.config import PiiScope, RecipientScope, When
from policies.detectors import Finding, PiiKind
from policies.facts import AttachmentFacts, MessageFacts
from policies.text import fold, normalize

MAX_EVIDENCE = 5
MAX_MASKED = 3

Outcome = tuple[bool, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Context:
    facts: MessageFacts
    known_domains: frozenset[str]
    subject_patterns: tuple[re.Pattern[str], ...] = ()
    body_patterns: tuple[re.Pattern[str], ...] = ()


def _evidence(items: Iterable[str]) -> tuple[str, ...]:
    items = list(dict.fromkeys(items))
    extra = len(items) - MAX_EVIDENCE
    return tuple(items[:MAX_EVIDENCE]) + ((f"… and {extra} more",) if extra > 0 else ())


def _flag(expected: bool, evidence: Iterable[str]) -> Outcome:
    """A yes/no fact: evidence lists why it is true; `false` in the rule inverts it."""
    shown = _evidence(evidence)
    return bool(shown) == expected, shown


def _globs(value: str, globs: tuple[str, ...]) -> bool:
    folded = fold(value)
    return any(fnmatchcase(folded, g) for g in _folded(globs))


@functools.lru_cache(maxsize=256)
def _folded(globs: tuple[str, ...]) -> tuple[str, ...]:
    """A rule's globs in matching form, folded once rather than per message."""
    return tuple(fold(g) for g in globs)


def sender(when: When, ctx: Context) -> Outcome:
    assert when.sender is not None
    return _flag(True, [ctx.facts.sender] if _globs(ctx.facts.sender, when.sender) else [])


def recipient_domain(when: When, ctx: Context) -> Outcome:
    assert when.recipient_domain is not None
    return _flag(True, (r.address for r in ctx.facts.recipients
                        if _globs(r.domain, when.recipient_domain)))


def sender_group(when: When, ctx: Context) -> Outcome:
    assert when.sender_group is not None
    return _flag(True, (f"group:{g}" for g in ctx.facts.sender_groups if g in when.sender_group))


def recipients(when: When, ctx: Context) -> Outcome:
    assert when.recipients is not None
    everyone, external = ctx.facts.recipients, ctx.facts.external
    match when.recipients:
        case RecipientScope.ANY_EXTERNAL:
            held = bool(external)
        case RecipientScope.ALL_EXTERNAL:
            held = bool(everyone) and len(external) == len(everyone)
        case RecipientScope.ALL_INTERNAL:
            held = bool(everyone) and not external
        case _ as unreachable:
            assert_never(unreachable)
    shown = [f"{len(external)} of {len(everyone)} recipients external"]
    return held, tuple(shown + [r.address for r in external][:MAX_EVIDENCE])


def external_recipients_at_least(when: When, ctx: Context) -> Outcome:
    assert when.external_recipients_at_least is not None
    count = len(ctx.facts.external)
    return count >= when.external_recipients_at_least, (f"{count} external recipients",)


def mixed_clients(when: When, ctx: Context) -> Outcome:
    """Recipients of more than one client company (unknown domains are no client)."""
    assert when.mixed_clients is not None
    by_client: dict[str, str] = {}
    for r in ctx.facts.external:
        if r.client is not None:
            by_client.setdefault(r.client, r.address)
    shown = [f"{a} is {c}" for c, a in by_client.items()] if len(by_client) > 1 else []
    return _flag(when.mixed_clients, shown)


def has_attachments(when: When, ctx: Context) -> Outcome:
    assert when.has_attachments is not None
    return _flag(when.has_attachments, (a.label for a in ctx.facts.attachments))


def attachment_name(when: When, ctx: Context) -> Outcome:
    """Globs on attachment names, and on the names inside a plain ZIP."""
    globs = when.attachment_name
    assert globs is not None
    shown = []
    for a in ctx.facts.attachments:
        shown += [a.label] if a.name and _globs(a.name, globs) else []
        shown += [f"{a.label} › {e}" for e in a.entries if _globs(e.rpartition("/")[2], globs)]
    return _flag(True, shown)


def attachment_type(when: When, ctx: Context) -> Outcome:
    assert when.attachment_type is not None
    wanted = set(when.attachment_type)
    return _flag(True, (f"{a.label}: {a.detected_type.value} ({a.declared_type})"
                        for a in ctx.facts.attachments if a.types & wanted))


def attachment_size_over(when: When, ctx: Context) -> Outcome:
    assert when.attachment_size_over is not None
    limit = when.attachment_size_over
    big = (a for a in ctx.facts.attachments if a.size > limit)
    return _flag(True, (f"{a.label}: {a.size} bytes" for a in big))


def attachment_client_mismatch(when: When, ctx: Context) -> Outcome:
    """A file marked for a client that is not every external recipient's client, or for two."""
    assert when.attachment_client_mismatch is not None
    return _flag(when.attachment_client_mismatch,
                 (e for a in ctx.facts.attachments for e in _mismatches(a, ctx.facts)))


def _mismatches(a: AttachmentFacts, facts: MessageFacts) -> list[str]:
    marks = {m.client: m for m in a.marks}
    if len(marks) > 1:
        named = ", ".join(f"'{m.marker}' ({m.client})" for m in marks.values())
        return [f"{a.label}: markers of {len(marks)} clients: {named}"]
    shown = []
    for client, mark in marks.items():
        for r in facts.external:
            if r.client != client:
                to = f"client {r.client}" if r.client else "not a client"
                shown.append(f"{a.label}: marker '{mark.marker}' ({mark.where}) is client "
                              f"{client}, but {r.address} is {to}")
    return shown


def encrypted_attachment(when: When, ctx: Context) -> Outcome:
    assert when.encrypted_attachment is not None
    return _flag(when.encrypted_attachment,
                 (f"{a.label}: encrypted {a.detected_type.value}"
                  for a in ctx.facts.attachments if a.encrypted))


def not_fully_inspected(when: When, ctx: Context) -> Outcome:
    assert when.not_fully_inspected is not None
    return _flag(when.not_fully_inspected, ctx.facts.not_fully_inspected)


def pii(when: When, ctx: Context) -> Outcome:
    assert when.pii is not None
    kinds, scope = set(when.pii), when.pii_in or PiiScope.ANY
    sources = _pii_sources(ctx.facts, scope)
    count, shown = 0, []
    for where, findings in sources:
        for kind in PiiKind:
            hits = [f.masked for f in findings if f.kind is kind and kind in kinds]
            if hits:
                count += len(hits)
                shown.append(_pii_line(kind, hits, where))
    return count >= (when.pii_min or 1), (f"{count} found", *_evidence(shown))


def _pii_sources(facts: MessageFacts, scope: PiiScope) -> list[tuple[str, tuple[Finding, ...]]]:
    body = [("body", facts.body_pii)]
    files = [(a.label, a.pii) for a in facts.attachments]
    match scope:
        case PiiScope.BODY:
            return body
        case PiiScope.ATTACHMENTS:
            return files
        case PiiScope.ANY:
            return body + files
        case _ as unreachable:
            assert_never(unreachable)


def _pii_line(kind: PiiKind, masked: list[str], where: str) -> str:
    sample = ", ".join(dict.fromkeys(masked[:MAX_MASKED]))
    more = ", …" if len(masked) > MAX_MASKED else ""
    return f"{kind.value} ×{len(masked)} in {where}: {sample}{more}"


def subject_matches(when: When, ctx: Context) -> Outcome:
    subject = normalize(ctx.facts.subject or "")
    return _flag(True, (f"subject matches /{p.pattern}/" for p in ctx.subject_patterns
                        if p.search(subject)))


def body_matches(when: When, ctx: Context) -> Outcome:
    return _flag(True, (f"body matches /{p.pattern}/" for p in ctx.body_patterns
                        if p.search(ctx.facts.body_text)))


def first_time_recipient_domain(when: When, ctx: Context) -> Outcome:
    assert when.first_time_recipient_domain is not None
    new = [r.domain for r in ctx.facts.external if r.domain not in ctx.known_domains]
    return _flag(when.first_time_recipient_domain, (f"first mail to {d}" for d in new))


CONDITIONS: dict[str, Callable[[When, Context], Outcome]] = {
    "sender": sender,
    "recipient_domain": recipient_domain,
    "sender_group": sender_group,
    "recipients": recipients,
    "external_recipients_at_least": external_recipients_at_least,
    "mixed_clients": mixed_clients,
    "has_attachments": has_attachments,
    "attachment_name": attachment_name,
    "attachment_type": attachment_type,
    "attachment_size_over": attachment_size_over,
    "attachment_client_mismatch": attachment_client_mismatch,
    "encrypted_attachment": encrypted_attachment,
    "not_fully_inspected": not_fully_inspected,
    "pii": pii,
    "subject_matches": subject_matches,
    "body_matches": body_matches,
    "first_time_recipient_domain": first_time_recipient_domain,
}
