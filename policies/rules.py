"""A rule compiled for evaluation, and its evaluation into a `RuleTrace`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from policies.conditions import CONDITIONS, Context
from policies.config import RuleSpec
from policies.facts import MessageFacts
from policies.verdict import Action, ConditionTrace, RuleTrace

# Distinct traces kept for reuse (see `_trace`), about 2 KB each; the table starts
# again when full. A steady load needs a few per rule.
MAX_SHARED_TRACES = 512

# (rule name, action, ((condition, matched, evidence), …)) → the trace they make.
_Outcomes = tuple[tuple[str, bool, tuple[str, ...]], ...]
_SHARED: dict[tuple[str, Action, _Outcomes], RuleTrace] = {}


@dataclass(frozen=True, slots=True)
class CompiledRule:
    spec: RuleSpec
    subject_patterns: tuple[re.Pattern[str], ...]
    body_patterns: tuple[re.Pattern[str], ...]
    conditions: tuple[str, ...]  # `spec.when.given()`, read once
    action: Action  # `spec.effective_action`

    @classmethod
    def compile(cls, spec: RuleSpec) -> CompiledRule:
        # Patterns were checked when the spec was validated; this cannot fail here.
        return cls(
            spec,
            tuple(re.compile(p) for p in spec.when.subject_matches or ()),
            tuple(re.compile(p) for p in spec.when.body_matches or ()),
            spec.when.given(),
            spec.effective_action,
        )

    @property
    def name(self) -> str:
        return self.spec.name


def evaluate(rule: CompiledRule, facts: MessageFacts, known_domains: frozenset[str]) -> RuleTrace:
    """Every condition is evaluated (no short cut), so the trace explains each one."""
    context = Context(facts, known_domains, rule.subject_patterns, rule.body_patterns)
    when = rule.spec.when
    outcomes = tuple((name, *CONDITIONS[name](when, context)) for name in rule.conditions)
    return _trace(rule.name, rule.action, outcomes)


def _trace(rule: str, action: Action, outcomes: _Outcomes) -> RuleTrace:
    """The trace of these outcomes, shared with earlier messages that had the same.

    Traces are frozen and a function of the rule and its outcomes, and most outcomes
    repeat from message to message (a rule that does not match says the same thing
    each time). Validating a pydantic model per condition per message was a quarter of
    the cost of inspecting a short mail.
    """
    key = (rule, action, outcomes)
    trace = _SHARED.get(key)
    if trace is None:
        trace = RuleTrace(
            rule=rule,
            matched=all(matched for _, matched, _ in outcomes),
            action=action,
            conditions=tuple(
                ConditionTrace(condition=name, matched=matched, evidence=evidence)
                for name, matched, evidence in outcomes
            ),
        )
        if len(_SHARED) >= MAX_SHARED_TRACES:
            _SHARED.clear()
        _SHARED[key] = trace
    return trace
