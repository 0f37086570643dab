"""Reads and writes of the approval workflow: decisions, the end of held and delayed
messages, and the listing the HTTP API pages through.

Like `quarantine.repository`, every function takes the caller's session and never
commits; `gateway.approvals` owns the transaction.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    Text,
    and_,
    bindparam,
    cast,
    insert,
    literal_column,
    or_,
    select,
    text,
    type_coerce,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from quarantine.models import Approval, Base, Message, Recipient, Reminder
from quarantine.states import MessageState, RecipientState, check_message

APPROVE = "approve"
REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Filters:
    state: MessageState | None = None
    sender: str | None = None
    recipient_domain: str | None = None
    rule: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(frozen=True, slots=True)
class Scope:
    """A coarse SQL pre-filter of what one person may see. It may let through more
    than they may see (the caller checks each row exactly) but never less.

    `everything` is for admins and auditors. Otherwise: messages sent by `user` or
    from one of `emails` (lower case); messages whose approver list names one of
    `principals`; if `unassigned`, held or delayed messages that name no approvers
    (the defaults apply), and mail held at delivery; and if `escalated_before` is
    set, messages held by a rule and older than that.
    """

    everything: bool = False
    user: str | None = None
    emails: tuple[str, ...] = ()
    principals: tuple[str, ...] = ()
    unassigned: bool = False
    escalated_before: datetime | None = None


def _verdict_text() -> ColumnElement[str]:
    return cast(Message.verdict, Text)


# Every distinct approver list in the store, one index seek each: rules name a few
# fixed lists, so this is a handful of rows however many messages there are.
_APPROVER_LISTS = text(
    """
    WITH RECURSIVE lists(approvers) AS (
        SELECT (SELECT approvers FROM messages WHERE approvers IS NOT NULL
                ORDER BY approvers LIMIT 1)
        UNION ALL
        SELECT (SELECT m.approvers FROM messages m WHERE m.approvers > lists.approvers
                ORDER BY m.approvers LIMIT 1)
        FROM lists WHERE lists.approvers IS NOT NULL
    )
    SELECT approvers FROM lists WHERE approvers IS NOT NULL
    """
)


def _names(approvers: str) -> set[str]:
    try:
        value = json.loads(approvers)
    except ValueError:
        return set()
    return {str(a) for a in value} if isinstance(value, list) else set()


@dataclass(frozen=True, slots=True)
class Branch:
    """One condition of a scope, the column of its index on (column, state, id), and
    the one state it is limited to, if any."""

    where: ColumnElement[bool]
    column: str | None = None
    only: MessageState | None = None

    def order(self) -> tuple[ColumnElement[Any], ...]:
        # The index's whole key, though within one (column, state) it is the id order:
        # so both planners see that the index gives the order, even for `IS NULL`
        # (PostgreSQL otherwise walked the primary key through a million rows).
        columns = _MESSAGES.c
        if self.column is None:
            return (columns.id,)
        return (columns[self.column], columns.state, columns.id)


async def _branches(session: AsyncSession, scope: Scope) -> list[Branch]:
    """The scope as separate conditions, each served in id order within a state by an
    index on (column, state, id): a page of their union is the union of a page of each."""
    branches: list[Branch] = []
    if scope.user is not None:
        branches.append(Branch(Message.sender_user == scope.user, "sender_user"))
    branches += [Branch(Message.sender_address == e, "sender_address") for e in scope.emails]
    mine = set(scope.principals)
    lists = (await session.scalars(_APPROVER_LISTS)).all() if mine or scope.unassigned else []
    for approvers in lists:
        names = _names(approvers)
        if names & mine or (scope.unassigned and not names):
            branches.append(Branch(Message.approvers == approvers, "approvers"))
    if scope.unassigned:  # held at delivery: no approver list, the defaults decide
        branches.append(Branch(Message.approvers.is_(None), "approvers", MessageState.HELD))
    if scope.escalated_before is not None:
        escalated = and_(
            Message.created_at <= scope.escalated_before,
            _verdict_text().contains('"action": "hold"', autoescape=True),
        )
        branches.append(Branch(escalated))
    return branches


def _filter_clauses(filters: Filters) -> list[ColumnElement[bool]]:
    """All but the state, which the caller adds once (a second `state = ?` term
    makes SQLite's planner leave the branch's index)."""
    clauses: list[ColumnElement[bool]] = []
    if filters.sender is not None:
        clauses.append(
            or_(
                Message.sender_user == filters.sender,
                Message.sender_address == filters.sender.lower(),
            )
        )
    if filters.recipient_domain is not None:
        clauses.append(
            select(Recipient.id)
            .where(
                Recipient.message_id == Message.id,
                Recipient.domain == filters.recipient_domain.lower(),
            )
            .exists()
        )
    if filters.rule is not None:
        clauses.append(Message.rule == filters.rule)
    if filters.since is not None:
        clauses.append(Message.created_at >= filters.since)
    if filters.until is not None:
        clauses.append(Message.created_at < filters.until)
    return clauses


async def page_of_messages(
    session: AsyncSession, filters: Filters, scope: Scope, *, after: str | None, limit: int
) -> Sequence[Message]:
    """Oldest first, by id (ids sort by time), starting after the cursor `after`."""
    wheres = _filter_clauses(filters)
    if after is not None:
        wheres.append(Message.id > after)
    if scope.everything:
        if filters.state is not None:
            wheres.append(Message.state == filters.state)
        return await _page(session, wheres, limit, (_MESSAGES.c.id,))
    # A page of ids per branch of the scope and per state, each read from an index, in
    # one statement; then the first `limit` of them. An OR of the branches would walk
    # every held message to find a few for someone whose rule holds little.
    states = list(MessageState) if filters.state is None else [filters.state]
    pages = [
        select(_MESSAGES.c.id)
        .where(branch.where, _MESSAGES.c.state == state, *wheres)
        .order_by(*branch.order())
        .limit(limit)
        .subquery()
        for branch in await _branches(session, scope)
        for state in states
        if branch.only in (None, state)
    ]
    if not pages:
        return []
    found = await session.scalars(union_all(*(select(page.c.id) for page in pages)))
    ids = sorted(set(found.all()))[:limit]
    return await _page(session, [Message.id.in_(ids)], limit, (_MESSAGES.c.id,)) if ids else []


async def _page(
    session: AsyncSession,
    wheres: list[ColumnElement[bool]],
    limit: int,
    order: tuple[ColumnElement[Any], ...],
) -> Sequence[Message]:
    query = select(Message).where(*wheres).order_by(*order).limit(limit)
    return (await session.scalars(query)).all()


async def get_message(session: AsyncSession, message_id: str) -> Message | None:
    return await session.get(Message, message_id)


# The statements of a decision are built once: a decision is a handful of one-row
# statements, and building them each time cost as much CPU as running them.
_LOCK_MESSAGE = (
    select(Message)
    .where(Message.id == bindparam("id"))
    .with_for_update()
    .execution_options(populate_existing=True)
)
_VOTES = (
    select(Approval.user, Approval.decision, Approval.at)
    .where(Approval.message_id == bindparam("id"))
    .order_by(Approval.id)
)
# Core statements on the tables: no unit of work, no session synchronisation.
_MESSAGES = Base.metadata.tables[Message.__tablename__]
_RECIPIENTS = Base.metadata.tables[Recipient.__tablename__]
_RECORD = insert(Base.metadata.tables[Approval.__tablename__])
_MESSAGE_STATE = update(_MESSAGES).where(_MESSAGES.c.id == bindparam("mid"))


def _waiting_of(message_id: ColumnElement[str] | str) -> ColumnElement[bool]:
    """A message's waiting recipients, found by the message_id index. SQLite plans
    without statistics and would walk the (state, next_attempt_at) index through every
    waiting recipient in the store instead (all held and delayed mail); `state || ''`
    cannot use an index, so it does not. PostgreSQL picks message_id either way."""
    return and_(
        _RECIPIENTS.c.message_id == message_id,
        type_coerce(_RECIPIENTS.c.state, String).concat(literal_column("''"))
        == RecipientState.WAITING.value,
    )


_RELEASE_RECIPIENTS = update(_RECIPIENTS).where(_waiting_of(bindparam("mid")))


async def lock_message(session: AsyncSession, message_id: str) -> Message | None:
    """The message row, locked until the transaction ends (`FOR UPDATE` on PostgreSQL;
    on SQLite the store's write lock already serialises writers). Read fresh, so a
    decision committed by another instance while we waited is seen."""
    message: Message | None = await session.scalar(_LOCK_MESSAGE, {"id": message_id})
    return message


@dataclass(frozen=True, slots=True)
class Vote:
    """Who decided what, and when: the part of an `Approval` a decision needs."""

    user: str
    decision: str
    at: datetime


async def votes_of(session: AsyncSession, message_id: str) -> list[Vote]:
    rows = await session.execute(_VOTES, {"id": message_id})
    return [Vote(user, decision, at) for user, decision, at in rows]


async def recipients_of(
    session: AsyncSession, message_ids: Sequence[str]
) -> dict[str, list[Recipient]]:
    found: dict[str, list[Recipient]] = defaultdict(list)
    if not message_ids:
        return found
    rows = await session.scalars(
        select(Recipient).where(Recipient.message_id.in_(message_ids)).order_by(Recipient.id)
    )
    for recipient in rows:
        found[recipient.message_id].append(recipient)
    return found


async def decisions_of(
    session: AsyncSession, message_ids: Sequence[str]
) -> dict[str, list[Approval]]:
    found: dict[str, list[Approval]] = defaultdict(list)
    if not message_ids:
        return found
    rows = await session.scalars(
        select(Approval).where(Approval.message_id.in_(message_ids)).order_by(Approval.id)
    )
    for approval in rows:
        found[approval.message_id].append(approval)
    return found


async def add_vote(
    session: AsyncSession,
    message_id: str,
    *,
    user: str,
    decision: str,
    comment: str | None,
    now: datetime,
) -> None:
    """Record one person's decision: one INSERT, nothing loaded back."""
    await session.execute(
        _RECORD,
        {
            "message_id": message_id,
            "user": user,
            "decision": decision,
            "comment": comment,
            "at": now,
        },
    )


async def release_locked(session: AsyncSession, message: Message, now: datetime) -> None:
    """Held or delayed → queued for a message the caller has locked (`lock_message`):
    its waiting recipients become due now. Two UPDATEs, and the loaded `message` is
    left as it was read (its state is the one before the release)."""
    target = check_message(message.state, MessageState.QUEUED)
    await session.execute(_MESSAGE_STATE, {"mid": message.id, "state": target, "updated_at": now})
    await session.execute(
        _RELEASE_RECIPIENTS,
        {
            "mid": message.id,
            "state": RecipientState.QUEUED,
            "next_attempt_at": now,
            "queued_at": now,
            "updated_at": now,
        },
    )


async def end_message(
    session: AsyncSession, message: Message, target: MessageState, now: datetime
) -> None:
    """Held or delayed → rejected, cancelled or expired: nobody will receive it."""
    message.state = check_message(message.state, target)
    message.updated_at = message.finished_at = now
    await session.execute(
        update(_RECIPIENTS)
        .where(_waiting_of(message.id))
        .values(state=RecipientState.CANCELLED, updated_at=now, finished_at=now)
    )


async def expired_holds(session: AsyncSession, now: datetime, limit: int = 100) -> list[str]:
    rows = await session.scalars(
        select(Message.id)
        .where(Message.state == MessageState.HELD, Message.release_at <= now)
        .order_by(Message.release_at)
        .limit(limit)
    )
    return list(rows.all())


# --- reminders ------------------------------------------------------------------


async def due_reminders(session: AsyncSession, before: datetime, limit: int = 100) -> list[str]:
    """Held messages waiting since `before` or longer whose deciders were not reminded
    since then (now - `remind_after` is `before`), oldest first."""
    rows = await session.scalars(
        select(Message.id)
        .outerjoin(Reminder, Reminder.message_id == Message.id)
        .where(
            Message.state == MessageState.HELD,
            Message.created_at <= before,
            or_(Reminder.reminded_at.is_(None), Reminder.reminded_at <= before),
        )
        .order_by(Message.created_at)
        .limit(limit)
    )
    return list(rows.all())


async def due_escalations(session: AsyncSession, before: datetime, limit: int = 100) -> list[str]:
    """Held messages waiting since `before` or longer that were never escalated."""
    rows = await session.scalars(
        select(Message.id)
        .outerjoin(Reminder, Reminder.message_id == Message.id)
        .where(
            Message.state == MessageState.HELD,
            Message.created_at <= before,
            Reminder.escalated_at.is_(None),
        )
        .order_by(Message.created_at)
        .limit(limit)
    )
    return list(rows.all())


async def claim_reminder(
    session: AsyncSession, message_id: str, now: datetime, before: datetime
) -> Message | None:
    """Record a reminder sent now, if the message is still held and nobody (another
    instance) reminded since `before`. The message row is locked first, so of two
    instances checking at once the second sees the first one's reminder."""
    message = await lock_message(session, message_id)
    if message is None or message.state is not MessageState.HELD:
        return None
    mark = await _reminder_row(session, message_id)
    if mark.reminded_at is not None and mark.reminded_at > before:
        return None
    mark.reminded_at = now
    return message


async def claim_escalation(session: AsyncSession, message_id: str, now: datetime) -> Message | None:
    """Record the escalation, once per message, as `claim_reminder` does reminders."""
    message = await lock_message(session, message_id)
    if message is None or message.state is not MessageState.HELD:
        return None
    mark = await _reminder_row(session, message_id)
    if mark.escalated_at is not None:
        return None
    mark.escalated_at = now
    return message


async def _reminder_row(session: AsyncSession, message_id: str) -> Reminder:
    mark = await session.get(Reminder, message_id, populate_existing=True)
    if mark is None:
        mark = Reminder(message_id=message_id)
        session.add(mark)
    return mark
