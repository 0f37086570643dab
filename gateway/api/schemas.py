"""Request and response bodies of /api/v1, and how a stored message is shown."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gateway.approvals import MessageView, Result, mask_personal_data
from quarantine.states import MessageState, RecipientState


class _Body(BaseModel):
    # A body with an unknown field is refused: nothing a client sends can change the
    # recipients or the content of the message being decided.
    model_config = ConfigDict(extra="forbid")


class ApproveBody(_Body):
    comment: str | None = Field(default=None, max_length=2000)


class RejectBody(_Body):
    reason: str = Field(min_length=1, max_length=2000)


class Error(BaseModel):
    detail: str


class RecipientOut(BaseModel):
    address: str
    state: RecipientState
    attempts: int
    last_code: int | None
    last_response: str | None


class DecisionOut(BaseModel):
    user: str
    decision: str
    comment: str | None
    at: datetime


class MessageSummary(BaseModel):
    id: str
    state: MessageState
    kind: str
    created_at: datetime
    waited_seconds: int = Field(description="how long it has waited (or waited) for a decision")
    mail_from: str
    sender_user: str | None
    subject: str | None
    rule: str | None
    recipient_domains: list[str]
    deciders: list[str] = Field(description="who decides: groups or users, as rules name them")
    approvals: int
    min_approvals: int
    release_at: datetime | None


class MessageDetail(MessageSummary):
    recipients: list[RecipientOut]
    attachments: list[dict[str, Any]]
    verdict: dict[str, Any]
    decisions: list[DecisionOut]
    preview: str | None
    masked: bool


class MessagePage(BaseModel):
    items: list[MessageSummary]
    next_cursor: str | None


class DecisionResult(BaseModel):
    id: str
    state: MessageState
    approvals: int
    min_approvals: int
    released: bool
    already: bool = Field(description="true when this person had already approved")


class AuditPage(BaseModel):
    items: list[dict[str, Any]]
    next_cursor: int | None


def summary(view: MessageView, now: datetime) -> MessageSummary:
    return MessageSummary.model_validate(_summary_fields(view, now))


def detail(view: MessageView, now: datetime) -> MessageDetail:
    message = view.message
    return MessageDetail.model_validate(
        {
            **_summary_fields(view, now),
            "recipients": [
                RecipientOut(
                    address=r.address,
                    state=r.state,
                    attempts=r.attempts,
                    last_code=r.last_code,
                    last_response=r.last_response,
                )
                for r in view.recipients
            ],
            "attachments": list(message.attachments or []),
            "verdict": dict(message.verdict or {}),
            "decisions": [
                DecisionOut(user=d.user, decision=d.decision, comment=d.comment, at=d.at)
                for d in view.decisions
            ],
            "preview": view.preview,
            "masked": view.masked,
        }
    )


def decision_result(result: Result) -> DecisionResult:
    return DecisionResult(
        id=result.message_id,
        state=result.state,
        approvals=result.approvals,
        min_approvals=result.needed,
        released=result.released,
        already=result.already,
    )


def _summary_fields(view: MessageView, now: datetime) -> dict[str, Any]:
    message = view.message
    pending = message.state in (MessageState.HELD, MessageState.DELAYED)
    until = now if pending else message.updated_at
    subject = message.subject
    if subject is not None and view.masked:
        subject = mask_personal_data(subject)
    return {
        "id": message.id,
        "state": message.state,
        "kind": message.kind,
        "created_at": message.created_at,
        "waited_seconds": max(0, int((until - message.created_at).total_seconds())),
        "mail_from": message.mail_from,
        "sender_user": message.sender_user,
        "subject": subject,
        "rule": message.rule,
        "recipient_domains": sorted({r.domain for r in view.recipients}),
        "deciders": list(view.deciders),
        "approvals": len({d.user for d in view.decisions if d.decision == "approve"}),
        "min_approvals": int((message.verdict or {}).get("min_approvals", 1) or 1),
        "release_at": message.release_at,
    }
