"""The outcome of evaluating a message: an action, its reason and a trace of every rule."""

from __future__ import annotations

import traceback
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

POLICY_ERROR = "policy-error"
NOT_INSPECTED = "not-inspected"


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
    description: str = ""
    trace: tuple[RuleTrace, ...] = ()
    encrypt: bool = False
    bcc: bool = False
    approvers: tuple[str, ...] = ()
    delay_seconds: int | None = None
    min_approvals: int = 1
    notify: str | None = None
    sender_may_release: bool = False  # the sender may end the delay early (delay only)

    @classmethod
    def deliver(cls) -> Verdict:
        return cls(action=Action.DELIVER)

    def smtp_reason(self) -> str:
        """`<rule>: <reason>` as one ASCII line, for `550 5.7.1 …` (or a 4xx/250 text).

        Without SMTPUTF8 a reply must be ASCII (RFC 5321 §4.2, RFC 6531 §3.7.4.2), and
        a CR or LF would end it early. Reasons are often written "日本語 / English":
        the English part after the last " / " is used; else the description if it is
        ASCII; else only the rule name and a generic phrase. The approver and the
        audit log keep the full reason.
        """
        rule = _ascii_line(self.rule or "policy")
        text = next(
            (t for t in (*_english_part(self.reason), self.description) if _is_plain(t)),
            "message refused by policy",
        )
        return f"{rule}: {_ascii_line(text)}"[:_MAX_REPLY_TEXT]

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
            trace=(RuleTrace(rule=POLICY_ERROR, matched=True, action=Action.HOLD, error=detail),),
        )

    def held_unwalked(self, why: str) -> Verdict:
        """Fail closed: parts the walk never reached (nested too deep, too many) were
        seen by no rule, so a verdict weaker than a hold becomes one. What the rules
        asked for (encryption, Bcc, approvers) is kept for when it is released."""
        if self.action.strength >= Action.HOLD.strength:
            return self
        return self.model_copy(
            update={
                "action": Action.HOLD,
                "rule": NOT_INSPECTED,
                "reason": f"parts of the message were not inspected ({why}); held for review",
                "delay_seconds": None,
                "sender_may_release": False,
                "trace": (
                    *self.trace,
                    RuleTrace(rule=NOT_INSPECTED, matched=True, action=Action.HOLD, error=why),
                ),
            }
        )


# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its code and CRLF.
_MAX_REPLY_TEXT = 400


def _english_part(reason: str) -> tuple[str, ...]:
    return (reason.rsplit(" / ", 1)[1].strip(), reason) if " / " in reason else (reason,)


def _is_plain(text: str) -> bool:
    return bool(text.strip()) and text.isascii()


def _ascii_line(text: str) -> str:
    cleaned = "".join(ch if " " <= ch <= "~" else " " for ch in text)
    return " ".join(cleaned.split())
