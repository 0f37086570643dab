"""/api/v1/messages: list, look, download, and decide. Each handler validates, calls
one function of `gateway.approvals.Approvals`, and shapes the answer."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response

from gateway.api import schemas
from gateway.api.auth import CurrentUser, client_address
from gateway.approvals import (
    ApprovalError,
    Approvals,
    Conflict,
    Forbidden,
    NotFound,
)
from gateway.ids import is_valid_id
from quarantine.approvals import Filters
from quarantine.states import MessageState

router = APIRouter(prefix="/messages", tags=["messages"])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": schemas.Error} for code in (400, 401, 403, 404, 409, 429)
}


def service(request: Request) -> Approvals:
    approvals: Approvals = request.app.state.approvals
    return approvals


Service = Annotated[Approvals, Depends(service)]


def message_id(id: str) -> str:
    # Unknown and malformed ids answer alike, so neither can be told from the other.
    if not is_valid_id(id):
        raise HTTPException(404, "no such message")
    return id


MessageId = Annotated[str, Depends(message_id)]


def error_status(error: ApprovalError) -> int:
    """The HTTP status of a refusal; `create_app` answers every ApprovalError with it."""
    match error:
        case NotFound():
            return 404
        case Forbidden():
            return 403
        case Conflict():
            return 409
        case _:
            return 400


@router.get("", response_model=schemas.MessagePage, responses=ERRORS)
async def list_messages(
    user: CurrentUser,
    approvals: Service,
    state: MessageState | None = None,
    sender: Annotated[str | None, Query(max_length=320)] = None,
    recipient_domain: Annotated[str | None, Query(max_length=255)] = None,
    rule: Annotated[str | None, Query(max_length=128)] = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: Annotated[str | None, Query(max_length=22)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> schemas.MessagePage:
    """Messages this person may see, oldest first; follow `next_cursor` for more."""
    if cursor is not None and not is_valid_id(cursor):
        raise HTTPException(422, "cursor is not a message id")
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise HTTPException(422, f"{name} needs a time zone, e.g. 2026-11-24T09:00:00Z")
    filters = Filters(state, sender, recipient_domain, rule, since, until)
    page = await approvals.list_messages(user, filters, after=cursor, limit=limit)
    now = approvals.clock()
    return schemas.MessagePage(
        items=[schemas.summary(v, now) for v in page.items], next_cursor=page.next_cursor
    )


@router.get("/{id}", response_model=schemas.MessageDetail, responses=ERRORS)
async def get_message(
    id: MessageId, request: Request, user: CurrentUser, approvals: Service, unmask: bool = False
) -> schemas.MessageDetail:
    """Envelope, subject, attachments, per-recipient status, the verdict's trace and a
    text preview with personal data masked. `unmask=true` (approver, admin, auditor)
    shows it unmasked. Every view is audited as `message.viewed`."""
    view = await approvals.view(user, id, unmask=unmask, client=client_address(request))
    return schemas.detail(view, approvals.clock())


@router.get(
    "/{id}/raw",
    response_class=Response,
    responses={**ERRORS, 200: {"content": {"message/rfc822": {}}}},
)
async def get_raw(
    id: MessageId, request: Request, user: CurrentUser, approvals: Service
) -> Response:
    """The original message as accepted (approver, admin, auditor); audited as
    `message.downloaded`."""
    raw = await approvals.raw(user, id, client=client_address(request))
    return Response(
        raw,
        media_type="message/rfc822",
        headers={"Content-Disposition": f'attachment; filename="{id}.eml"'},
    )


@router.post("/{id}/approve", response_model=schemas.DecisionResult, responses=ERRORS)
async def approve(
    id: MessageId,
    user: CurrentUser,
    approvals: Service,
    body: Annotated[schemas.ApproveBody | None, Body()] = None,
) -> schemas.DecisionResult:
    """Approve a held message. It is released, exactly as stored, once `min_approvals`
    different people have approved. Approving twice counts once."""
    result = await approvals.approve(user, id, body.comment if body else None)
    return schemas.decision_result(result)


@router.post("/{id}/reject", response_model=schemas.DecisionResult, responses=ERRORS)
async def reject(
    id: MessageId, body: schemas.RejectBody, user: CurrentUser, approvals: Service
) -> schemas.DecisionResult:
    """Reject a held message; nobody receives it."""
    result = await approvals.reject(user, id, body.reason)
    return schemas.decision_result(result)


@router.post("/{id}/cancel", response_model=schemas.DecisionResult, responses=ERRORS)
async def cancel(id: MessageId, user: CurrentUser, approvals: Service) -> schemas.DecisionResult:
    """The sender takes back a delayed message during its delay window."""
    result = await approvals.cancel(user, id)
    return schemas.decision_result(result)


@router.post("/{id}/release-now", response_model=schemas.DecisionResult, responses=ERRORS)
async def release_now(
    id: MessageId, user: CurrentUser, approvals: Service
) -> schemas.DecisionResult:
    """End a delay early: approvers and admins, and the sender where every rule that
    delayed the message allows it (`sender_may_release`). Never for held mail."""
    result = await approvals.release_now(user, id)
    return schemas.decision_result(result)
