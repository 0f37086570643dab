"""Warnings for rules and clients that are valid but probably not what was meant.

Errors (unknown keys, bad regexes, duplicates) fail validation in `policies.config`;
these only warn, because the config still works.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from itertools import combinations

from policies.config import ClientSpec, RuleSpec, ZipMethod
from policies.text import fold
from policies.verdict import Action

GROUP_PREFIX = "group:"


def lint(
    rules: Sequence[RuleSpec], clients: Sequence[ClientSpec], known_groups: set[str]
) -> list[str]:
    return [
        *_approver_groups(rules, known_groups),
        *_approvers_without_hold(rules),
        *_weak_zip(clients),
        *_overlapping_domains(clients),
        *_markers_of_two_clients(clients),
    ]


def _approver_groups(rules: Sequence[RuleSpec], known_groups: set[str]) -> Iterable[str]:
    for rule in rules:
        for approver in rule.approvers:
            group = approver.removeprefix(GROUP_PREFIX)
            if approver.startswith(GROUP_PREFIX) and group not in known_groups:
                yield (f"rule '{rule.name}': approvers group '{group}' has no members, "
                       "so nobody can approve what it holds")


def _approvers_without_hold(rules: Sequence[RuleSpec]) -> Iterable[str]:
    for rule in rules:
        if rule.approvers and rule.effective_action is not Action.HOLD:
            yield (f"rule '{rule.name}': approvers only matter for action 'hold' "
                   f"(they are kept in case another rule holds)")


def _weak_zip(clients: Sequence[ClientSpec]) -> Iterable[str]:
    for client in clients:
        if client.zip_method is ZipMethod.ZIPCRYPTO:
            yield (f"client '{client.name}': zip_method 'zipcrypto' is weak "
                   "(known-plaintext attacks); use it only for recipients who cannot open AES")


def _overlapping_domains(clients: Sequence[ClientSpec]) -> Iterable[str]:
    for first, second in combinations(clients, 2):
        for a in first.domains:
            for b in second.domains:
                if a == b or fnmatchcase(a, b) or fnmatchcase(b, a):
                    yield (f"clients '{first.name}' and '{second.name}' overlap on domain "
                           f"'{a}' / '{b}'; '{first.name}' (listed first) wins")


def _markers_of_two_clients(clients: Sequence[ClientSpec]) -> Iterable[str]:
    owner: dict[str, str] = {}
    for client in clients:
        for marker in client.markers:
            other = owner.setdefault(fold(marker), client.name)
            if other != client.name:
                yield f"marker '{marker}' belongs to both '{other}' and '{client.name}'"
