"""The rules in force, compiled once from config and swapped whole on reload."""

from __future__ import annotations

import json

from gateway.config import Config
from policies import report
from policies.engine import Inspection, Policy
from policies.lint import lint


def compile_policy(config: Config) -> Policy:
    return Policy.compile(config.rules, config.clients, config.organization.domains)


class PolicySource:
    def __init__(self, config: Config) -> None:
        self._policy = compile_policy(config)

    def current(self) -> Policy:
        return self._policy

    def replace(self, config: Config) -> None:
        self._policy = compile_policy(config)


def lint_config(config: Config, known_groups: set[str] | None = None) -> list[str]:
    """Warnings that do not stop the gateway (an approver group nobody is in, a weak
    ZIP method). Without the users' groups, the group check is skipped."""
    warnings = lint(config.rules, config.clients, known_groups or set())
    if known_groups is None:
        warnings = [w for w in warnings if "has no members" not in w]
    return warnings


def render_inspection(result: Inspection, *, as_json: bool) -> str:
    if as_json:
        return json.dumps(report.as_json(result), ensure_ascii=False, indent=2, default=str)
    return report.as_text(result)
