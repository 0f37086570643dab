"""Many matched rules, one verdict.

- The strongest action wins: refuse > hold > delay > deliver. Its first matching rule
  (in config order) names the verdict and gives the reason.
- Transforms (`encrypt`, `bcc`) and approvers accumulate over every matched rule.
- `min_approvals` is the largest any matched hold rule asks for.
- `delay_seconds` is the longest delay of the matched delay rules: a delay is the
  sender's window to notice and cancel, and the strictest rule should keep its window.
  It is set only when the verdict is `delay`.
- `sender_may_release` holds only for a `delay` verdict, and only if every matched
  delay rule allows it: the sender may cut short a delay only when no rule that asked
  for one wants its window kept. (The longest delay comes from any of them, so one
  rule that does not allow it keeps the window for all.)
"""

from __future__ import annotations

from collections.abc import Sequence

from policies.rules import CompiledRule
from policies.verdict import Action, RuleTrace, Verdict


def combine(rules: Sequence[CompiledRule], traces: Sequence[RuleTrace]) -> Verdict:
    matched = [rule for rule, trace in zip(rules, traces, strict=True) if trace.matched]
    if not matched:
        return Verdict(action=Action.DELIVER, trace=tuple(traces))
    action = max((r.action for r in matched), key=lambda a: a.strength)
    winner = next(r for r in matched if r.action is action)
    specs = [r.spec for r in matched]
    delays = [s.delay for s in specs if s.action is Action.DELAY and s.delay]
    holds = [s.min_approvals for s in specs if s.action is Action.HOLD]
    delaying = [s for s in specs if s.action is Action.DELAY]
    return Verdict(
        action=action,
        rule=winner.name,
        reason=winner.spec.reason or winner.spec.description or winner.name,
        description=winner.spec.description,
        trace=tuple(traces),
        encrypt=any(s.encrypt for s in specs),
        bcc=any(s.bcc for s in specs),
        approvers=tuple(dict.fromkeys(a for s in specs for a in s.approvers)),
        delay_seconds=max(delays) if action is Action.DELAY and delays else None,
        min_approvals=max(holds, default=1),
        notify=winner.spec.notify or next((s.notify for s in specs if s.notify), None),
        sender_may_release=action is Action.DELAY and all(s.sender_may_release for s in delaying),
    )
