"""What `sekisho policy test` prints: the verdict, each rule's trace, the facts seen.

Only masked evidence and names appear: never a body, a full personal-data value or
a ZIP password.
"""

from __future__ import annotations

from typing import Any

from policies.engine import Inspection
from policies.facts import AttachmentFacts, MessageFacts
from policies.verdict import RuleTrace, Verdict


def as_json(inspection: Inspection) -> dict[str, Any]:
    facts = inspection.facts
    return {
        "verdict": _verdict(inspection.verdict),
        "rules": [t.model_dump(mode="json") for t in inspection.verdict.trace],
        "facts": _facts(facts) if facts is not None else None,
    }


def _verdict(verdict: Verdict) -> dict[str, Any]:
    data = verdict.model_dump(mode="json", exclude={"trace"})
    data["smtp_reason"] = verdict.smtp_reason()
    return data


def _facts(facts: MessageFacts) -> dict[str, Any]:
    return {
        "sender": facts.sender,
        "sender_groups": list(facts.sender_groups),
        "recipients": [
            {"address": r.address, "internal": r.internal, "client": r.client}
            for r in facts.recipients
        ],
        "subject": facts.subject,
        "body_pii": [f"{f.kind.value}: {f.masked}" for f in facts.body_pii],
        "attachments": [_attachment(a) for a in facts.attachments],
        "not_fully_inspected": list(facts.not_fully_inspected),
    }


def _attachment(a: AttachmentFacts) -> dict[str, Any]:
    return {
        "name": a.name,
        "declared_type": a.declared_type,
        "detected_type": a.detected_type.value,
        "size": a.size,
        "encrypted": a.encrypted,
        "inside_message": a.inside_message,
        "entries": list(a.entries),
        "markers": [{"client": m.client, "marker": m.marker, "where": m.where} for m in a.marks],
        "pii": [f"{f.kind.value}: {f.masked}" for f in a.pii],
    }


def as_text(inspection: Inspection) -> str:
    verdict = inspection.verdict
    lines = [f"verdict: {verdict.action.value}" + (f" ({verdict.rule})" if verdict.rule else "")]
    if verdict.rule:
        lines.append(f"  reason: {verdict.reason}")
    lines += _transforms(verdict)
    lines.append("rules:")
    for trace in verdict.trace:
        lines += _rule_lines(trace)
    if inspection.facts is not None:
        lines += _fact_lines(inspection.facts)
    return "\n".join(lines) + "\n"


def _transforms(verdict: Verdict) -> list[str]:
    extra = [name for name, on in (("encrypt", verdict.encrypt), ("bcc", verdict.bcc)) if on]
    lines = [f"  transforms: {', '.join(extra)}"] if extra else []
    if verdict.approvers:
        lines.append(f"  approvers: {', '.join(verdict.approvers)} "
                     f"(min {verdict.min_approvals})")
    if verdict.delay_seconds is not None:
        lines.append(f"  delay: {verdict.delay_seconds}s")
    return lines


def _rule_lines(trace: RuleTrace) -> list[str]:
    mark = "✔" if trace.matched else "·"
    lines = [f"  {mark} {trace.rule} → {trace.action.value}"]
    if trace.error:
        lines.append(f"      error: {trace.error}")
    for condition in trace.conditions:
        held = "yes" if condition.matched else "no"
        lines.append(f"      {condition.condition}: {held}")
        lines += [f"        - {e}" for e in condition.evidence]
    return lines


def _fact_lines(facts: MessageFacts) -> list[str]:
    lines = ["facts:", f"  from: {facts.sender}", f"  subject: {facts.subject}"]
    for r in facts.recipients:
        where = "internal" if r.internal else f"external, client {r.client or '-'}"
        lines.append(f"  to: {r.address} ({where})")
    for f in facts.body_pii:
        lines.append(f"  body: {f.kind.value} {f.masked}")
    for a in facts.attachments:
        lines.append(f"  attachment: {a.label} [{a.detected_type.value}, {a.declared_type}, "
                     f"{a.size} bytes{', encrypted' if a.encrypted else ''}]")
        lines += [f"    marker '{m.marker}' of {m.client} in {m.where}" for m in a.marks]
        lines += [f"    entry: {e}" for e in a.entries[:20]]
        lines += [f"    {f.kind.value} {f.masked}" for f in a.pii[:10]]
    lines += [f"  not fully inspected: {reason}" for reason in facts.not_fully_inspected]
    return lines
