"""A rule compiled for evaluation, and its evaluation into a `RuleTrace`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from policies.conditions import CONDITIONS, Context
from policies.config import RuleSpec
from policies.facts import MessageFacts
from policies.verdict import Action, ConditionTrace, RuleTrace


@dataclass(frozen=True, slots=True)
class CompiledRule:
    spec: RuleSpec
    subject_patterns: tuple[re.Pattern[str], ...]
    body_patterns: tuple[re.Pattern[str], ...]

    @classmethod
    def compile(cls, spec: RuleSpec) -> CompiledRule:
        # Patterns were checked when the spec was validated; this cannot fail here.
        return cls(
            spec,
            tuple(re.compile(p) for p in spec.when.subject_matches or ()),
            tuple(re.compile(p) for p in spec.when.body_matches or ()),
        )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def action(self) -> Action:
        return self.spec.effective_action


def evaluate(rule: CompiledRule, facts: MessageFacts, known_domains: frozenset[str]) -> RuleTrace:
    """Every condition is evaluated (no short cut), so the trace explains each one."""
    context = Context(facts, known_domains, rule.subject_patterns, rule.body_patterns)
    conditions = tuple(_condition(name, rule, context) for name in rule.spec.when.given())
    return RuleTrace(
        rule=rule.name,
        matched=all(c.matched for c in conditions),
        action=rule.action,
        conditions=conditions,
    )


def _condition(name: str, rule: CompiledRule, context: Context) -> ConditionTrace:
    matched, evidence = CONDITIONS[name](rule.spec.when, context)
    return ConditionTrace(condition=name, matched=matched, evidence=evidence)
