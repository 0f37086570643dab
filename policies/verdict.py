"""The outcome of evaluating a message: an action, its reason and a trace of every rule."""

from __future__ import annotations

import traceback
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

POLICY_ERROR = "policy-error"


class Action(StrEnum):
    DELIVER = "deliver"
    DELAY = "delay"
    HOLD = "hold"
    REFUSE = "refuse"

    @property
    def strength(self) -> int:
        return _STRENGTH[self]


_STRENGTH = {Action.DELIVER: 0, Action.DELAY: 1, Action.HOLD: 2, Action.REFUSE: 3}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConditionTrace(_Frozen):
    """One `when.*` condition of one rule: whether it held, and what showed it.

    Evidence is always masked: a filename and the client marker found, or the kind
    and count of personal data with masked values. Never a full value.
    """

    condition: str
    matched: bool
    evidence: tuple[str, ...] = ()


class RuleTrace(_Frozen):
    rule: str
    matched: bool
    action: Action
    conditions: tuple[ConditionTrace, ...] = ()
    error: str | None = None


class Verdict(_Frozen):
    action: Action
    rule: str | None = None
    reason: str = ""
    trace: tuple[RuleTrace, ...] = ()
    encrypt: bool = False
    bcc: bool = False
    approvers: tuple[str, ...] = ()
    delay_seconds: int | None = None
    min_approvals: int = 1
    notify: str | None = None

    @classmethod
    def deliver(cls) -> Verdict:
        return cls(action=Action.DELIVER)

    @classmethod
    def policy_error(cls, error: BaseException) -> Verdict:
        """Fail closed: anything the engine cannot evaluate is held for a person."""
        where = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
        place = f" at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno}" if where else ""
        detail = f"{type(error).__name__}{place}"
        return cls(
            action=Action.HOLD,
            rule=POLICY_ERROR,
            reason="the message could not be inspected; held for review",
            trace=(
                RuleTrace(rule=POLICY_ERROR, matched=True, action=Action.HOLD, error=detail),
            ),
        )
