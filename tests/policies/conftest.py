from __future__ import annotations

import pytest
from policy_samples import CLIENTS, ISSUE_RULES

from policies.engine import Policy


@pytest.fixture
def book_policy() -> Policy:
    """The two sample clients, no rules: for tests of facts."""
    return Policy.compile([], CLIENTS, ["corp.example"])


@pytest.fixture
def issue_policy() -> Policy:
    return Policy.compile(ISSUE_RULES, CLIENTS, ["corp.example"])
