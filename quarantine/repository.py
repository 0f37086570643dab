"""Reads and writes of the store. Every function takes the caller's session and
never commits: the service layer owns the transaction (`async with store.transaction()`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Table,
    Text,
    Update,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.visitors import InternalTraversal

from policies.clients import domain_of  # the one normal form: what the rules compare
from quarantine.models import (
    Body,
    KnownDomain,
    Message,
    Recipient,
    approvers_key,
    sender_address_key,
)
from quarantine.prepared import Prepared, direct
from quarantine.states import (
    DUE_RECIPIENT_STATES,
    FINAL_RECIPIENT_STATES,
    MessageState,
    RecipientState,
    check_message,
)

_RECIPIENTS: Table = Recipient.__table__  # type: ignore[assignment]
_MESSAGES: Table = Message.__table__  # type: ignore[assignment]
_BODIES: Table = Body.__table__  # type: ignore[assignment]
_recipients = _RECIPIENTS.c
_messages = _MESSAGES.c
_bodies = _BODIES.c


@dataclass(frozen=True, slots=True)
class NewMessage:
    id: str
    mail_from: str
    rcpt_tos: Sequence[str]
    raw: bytes
    state: MessageState
    verdict: dict[str, Any]
    subject: str | None = None
    rule: str | None = None
    attachments: list[Any] = field(default_factory=list)
    sender_user: str | None = None
    client_address: str | None = None
    helo: str | None = None
    release_at: datetime | None = None
    kind: str = "message"


async def add_message(session: AsyncSession, new: NewMessage, now: datetime) -> None:
    """Insert a message, its body and one row per recipient in the caller's transaction."""
    await session.run_sync(add_messages, [(new, now)])


# Functions taking a (sync) `Session` are the hot path: they run whole inside
# `Store.run`, on SQLite in one hand-off to the store's thread.


@dataclass(frozen=True, slots=True)
class Lease:
    """Recipients of these messages are inserted already leased to `owner`, and come
    back as claims: delivery starts their sends without a claiming transaction."""

    owner: str
    until: datetime
    message_ids: AbstractSet[str]


def add_messages(
    session: Session, batch: Sequence[tuple[NewMessage, datetime]], lease: Lease | None = None
) -> list[Claim]:
    """Insert several messages in three statements whatever their number and their
    recipients': this is the hot path of every accepted message (group commit).
    Return the claims of the messages `lease` names (their recipients' ids come back
    from the insert itself)."""
    conn = session.connection()  # Core statements: the ORM session adds only cost here
    _INSERT_MESSAGES.execute(conn, [_message_row(new, now) for new, now in batch])
    streamed = direct(conn)  # SQLite: its blob API takes a large body in pieces
    large = {new.id: new.raw for new, _ in batch if streamed and len(new.raw) >= STREAMED_BODY}
    small = [{"message_id": new.id, "raw": new.raw} for new, _ in batch if new.id not in large]
    _INSERT_BODIES.execute(conn, small)
    for message_id, raw in large.items():
        _stream_body(session, message_id, raw)
    rows = [row for new, now in batch for row in _recipient_rows(new, now)]
    if lease is None:
        _INSERT_RECIPIENTS.execute(conn, rows)
        return []
    for row in rows:
        if row["message_id"] in lease.message_ids:
            row["lease_owner"], row["lease_expires_at"] = lease.owner, lease.until
    ids = [rid for (rid,) in _INSERT_RECIPIENTS_RETURNING.returning(conn, rows)]
    return _new_claims(batch, lease, rows, ids)


_MESSAGE_COLUMNS = [c.key for c in _MESSAGES.columns]
_RECIPIENT_COLUMNS = [
    "message_id",
    "address",
    "domain",
    "state",
    "attempts",
    "next_attempt_at",
    "updated_at",
    "queued_at",
    "lease_owner",
    "lease_expires_at",
]
_INSERT_MESSAGES = Prepared(insert(_MESSAGES), _MESSAGE_COLUMNS)
_INSERT_BODIES = Prepared(insert(_BODIES), ["message_id", "raw"])
_INSERT_RECIPIENTS = Prepared(insert(_RECIPIENTS), _RECIPIENT_COLUMNS)
_INSERT_RECIPIENTS_RETURNING = Prepared(
    insert(_RECIPIENTS).returning(_recipients.id, sort_by_parameter_order=True),
    _RECIPIENT_COLUMNS,
)


def _new_claims(
    batch: Sequence[tuple[NewMessage, datetime]],
    lease: Lease,
    rows: Sequence[dict[str, Any]],
    ids: Sequence[int],
) -> list[Claim]:
    """The claims of just-inserted, leased messages, as `claim_due` would build them,
    from what the caller already holds and the ids the insert returned, row for row."""
    found: dict[str, dict[str, list[ClaimedRecipient]]] = defaultdict(lambda: defaultdict(list))
    for row, rid in zip(rows, ids, strict=True):
        if row["message_id"] in lease.message_ids:
            found[row["message_id"]][row["domain"]].append(
                ClaimedRecipient(rid, row["address"], 0, row["updated_at"])
            )
    return [
        Claim(new.id, new.mail_from, new.kind, now, new.verdict, domain, tuple(r), new.raw)
        for new, now in batch
        for domain, r in found.get(new.id, {}).items()
    ]


def transactions_of(new: NewMessage) -> int:
    """How many claims (SMTP transactions: one per recipient domain) a message makes."""
    return len({domain_of(address) for address in new.rcpt_tos})


# SQLite copies a bound blob twice (the bound value and the record it builds): a
# 50 MB body cost 100 MB more at the commit. Above this size the body goes into a
# zero-filled blob of its size through SQLite's blob API, a megabyte at a time.
STREAMED_BODY = 1 << 20
_CHUNK = 1 << 20
_ROWID = text("SELECT rowid FROM bodies WHERE message_id = :id")


def _stream_body(session: Session, message_id: str, raw: bytes) -> None:
    session.execute(insert(_BODIES).values(message_id=message_id, raw=func.zeroblob(len(raw))))
    rowid = session.scalar(_ROWID, {"id": message_id})
    sqlite = session.connection().connection.driver_connection
    view = memoryview(raw)
    with sqlite.blobopen("bodies", "raw", rowid) as blob:  # type: ignore[union-attr]
        for start in range(0, len(view), _CHUNK):
            blob.write(view[start : start + _CHUNK])


def _message_row(new: NewMessage, now: datetime) -> dict[str, Any]:
    return {
        "id": new.id,
        "created_at": now,
        "updated_at": now,
        "state": new.state,
        "kind": new.kind,
        "mail_from": new.mail_from,
        "sender_user": new.sender_user,
        "client_address": new.client_address,
        "helo": new.helo,
        "subject": new.subject,
        "size": len(new.raw),
        "rule": new.rule,
        "verdict": new.verdict,
        "attachments": new.attachments,
        "release_at": new.release_at,
        "finished_at": None,
        # What the columns' defaults would derive, given here: no default runs.
        "approvers": approvers_key(new.verdict),
        "sender_address": sender_address_key(new.mail_from),
    }


def _recipient_rows(new: NewMessage, now: datetime) -> list[dict[str, Any]]:
    released = new.state is MessageState.QUEUED
    return [
        {
            "message_id": new.id,
            "address": address,
            "domain": domain_of(address),
            "state": RecipientState.QUEUED if released else RecipientState.WAITING,
            "attempts": 0,
            "next_attempt_at": now if released else None,
            "updated_at": now,
            "queued_at": now if released else None,
            # Every row carries every key: an executemany takes its columns from the
            # first row and silently drops the keys a later row adds (a leased message
            # after a held one would be inserted unleased, and sent twice).
            "lease_owner": None,
            "lease_expires_at": None,
        }
        for address in new.rcpt_tos
    ]


@dataclass(frozen=True, slots=True)
class Claim:
    """Recipients of one message at one domain, leased to one worker: one SMTP transaction."""

    message_id: str
    mail_from: str
    kind: str
    created_at: datetime
    verdict: dict[str, Any]
    domain: str
    recipients: tuple[ClaimedRecipient, ...]
    raw: bytes | None = None  # loaded with the claim: one round trip less per send


@dataclass(frozen=True, slots=True)
class ClaimedRecipient:
    id: int
    address: str
    attempts: int
    queued_at: datetime


# The delivery hot path's statements are built once: building a statement costs more
# CPU than SQLite takes to run it, and a prebuilt one also hits the compiled cache
# without computing its cache key again. Core, not ORM: nothing here needs objects.

_DUE = (
    select(_recipients.id, _recipients.message_id, _recipients.domain)
    .where(
        _recipients.state.in_(sorted(DUE_RECIPIENT_STATES)),
        _recipients.next_attempt_at <= bindparam("now"),
        # only released mail: a message held again at delivery sends nothing more
        select(_messages.id)
        .where(_messages.id == _recipients.message_id, _messages.state == MessageState.QUEUED)
        .exists(),
        or_(
            _recipients.lease_expires_at.is_(None),
            _recipients.lease_expires_at < bindparam("now"),
        ),
    )
    .order_by(_recipients.next_attempt_at)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
_LEASE = (
    update(_RECIPIENTS)
    .where(_recipients.id.in_(bindparam("ids", expanding=True)))
    .values(lease_owner=bindparam("owner"), lease_expires_at=bindparam("until"))
)
_CLAIMED = (
    select(
        _recipients.id,
        _recipients.address,
        _recipients.attempts,
        _recipients.queued_at,
        _recipients.domain,
        _messages.id,
        _messages.mail_from,
        _messages.kind,
        _messages.created_at,
        _messages.verdict,
    )
    .join(_MESSAGES, _messages.id == _recipients.message_id)
    .where(_recipients.id.in_(bindparam("ids", expanding=True)))
    .order_by(_recipients.id)
)
_CLAIMED_BODIES = select(_bodies.message_id, _bodies.raw).where(
    _bodies.message_id.in_(bindparam("ids", expanding=True))
)


def claim_due(
    session: Session,
    *,
    owner: str,
    now: datetime,
    lease: timedelta,
    limit: int,
    max_groups: int | None = None,
) -> list[Claim]:
    """Lease due recipients, grouped into at most `max_groups` (message, domain)
    transactions. On PostgreSQL, `FOR UPDATE SKIP LOCKED` lets several
    instances claim at once without waiting on each other or taking the same row;
    SQLAlchemy drops it on SQLite, where the store's write lock serialises claims.
    """
    # Lease only as many transactions as the caller can start now: a lease must not
    # run out while its claim waits in this process for a free worker, or the same
    # recipients would be claimed again and sent twice.
    kept: dict[tuple[str, str], None] = {}
    ids = []
    conn = session.connection()
    for rid, message_id, domain in conn.execute(_DUE, {"now": now, "limit": limit}):
        key = (message_id, domain)
        if key not in kept and max_groups is not None and len(kept) >= max_groups:
            continue
        kept[key] = None
        ids.append(rid)
    if not ids:
        return []
    conn.execute(_LEASE, {"ids": ids, "owner": owner, "until": now + lease})
    groups: dict[tuple[str, str], list[ClaimedRecipient]] = defaultdict(list)
    messages: dict[str, tuple[str, str, datetime, dict[str, Any]]] = {}
    rows = conn.execute(_CLAIMED, {"ids": ids})
    for rid, address, attempts, queued_at, domain, mid, mail_from, kind, created, verdict in rows:
        groups[(mid, domain)].append(ClaimedRecipient(rid, address, attempts, queued_at or created))
        messages[mid] = (mail_from, kind, created, verdict)
    found = conn.execute(_CLAIMED_BODIES, {"ids": list(messages)})
    bodies: dict[str, bytes | None] = {mid: raw for mid, raw in found}
    return [
        Claim(mid, *messages[mid], domain, tuple(rcpts), bodies.get(mid))
        for (mid, domain), rcpts in groups.items()
    ]


async def load_raw(session: AsyncSession, message_id: str) -> bytes | None:
    return await session.scalar(_BODY, {"id": message_id})


_BODY = select(_bodies.raw).where(_bodies.message_id == bindparam("id"))


@dataclass(frozen=True, slots=True)
class OutcomeRow:
    """One recipient's result, as delivery hands it to `record_outcomes`."""

    recipient_id: int
    state: RecipientState
    code: int | None
    response: str
    next_attempt_at: datetime | None = None


class _Unindexed(ColumnElement[Any]):
    """A column that SQLite must not pick an index for: `+column` there, the column
    elsewhere (SQLite's own way to steer its planner, which keeps no statistics)."""

    inherit_cache = True
    _traverse_internals = [("column", InternalTraversal.dp_clauseelement)]  # noqa: RUF012

    def __init__(self, column: ColumnElement[Any]) -> None:
        self.column = column
        self.type = column.type


@compiles(_Unindexed)
def _column(element: _Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(element.column, **kw)


@compiles(_Unindexed, "sqlite")
def _unary_plus(element: _Unindexed, compiler: SQLCompiler, **kw: Any) -> str:
    return "+" + compiler.process(element.column, **kw)


def _each(column: ColumnElement[Any], values: Iterable[Any]) -> list[ColumnElement[Any]]:
    """A fixed IN list as one bind per value: a list of values would be one expanding
    bind, rendered per execution, which a `Prepared` statement cannot take."""
    return [literal(value, column.type) for value in sorted(values)]


def _record_statement(which: ColumnElement[bool]) -> Update:
    return (
        update(_RECIPIENTS)
        .where(
            which,
            _recipients.lease_owner == bindparam("owner"),
            # By id, never by the state index: SQLite would otherwise read every queued
            # and deferred recipient (all of a backlog) to record a handful.
            _Unindexed(_recipients.state).in_(_each(_recipients.state, DUE_RECIPIENT_STATES)),
        )
        .values(
            state=bindparam("state"),
            last_code=bindparam("code"),
            last_response=bindparam("response"),
            updated_at=bindparam("now"),
            attempts=_recipients.attempts + 1,
            next_attempt_at=bindparam("next_attempt_at"),
            lease_owner=None,
            lease_expires_at=None,
            finished_at=bindparam("finished_at"),
        )
        .returning(_recipients.id)
    )


def _in_json(column: ColumnElement[Any]) -> ColumnElement[bool]:
    """`column IN` the ids of a JSON array bound as one value (SQLite's json_each): a
    `Prepared` statement takes no expanding IN list, and SQLite still looks each id
    up by its key."""
    ids = func.json_each(bindparam("ids_json", type_=Text())).table_valued("value")
    return column.in_(select(ids.c.value))


# An expanding IN list through SQLAlchemy (PostgreSQL); on SQLite, on the cursor.
_RECORD = _record_statement(_recipients.id.in_(bindparam("ids", expanding=True)))
_RECORD_SQLITE = Prepared(_record_statement(_in_json(_recipients.id)))


def record_outcomes(
    session: Session, outcomes: Iterable[OutcomeRow], *, owner: str, now: datetime
) -> set[int]:
    """Record recipients' outcomes, if we still hold their leases; return the ids kept.

    A recipient whose lease was lost (expired and taken by another worker) is left
    alone: the other worker's result stands. Outcomes that share their values (one
    SMTP transaction answers every recipient alike) are one statement.
    """
    alike: dict[tuple[RecipientState, int | None, str, datetime | None], list[int]] = {}
    for o in outcomes:
        key = (o.state, o.code, o.response[:1000], o.next_attempt_at)
        alike.setdefault(key, []).append(o.recipient_id)
    kept: set[int] = set()
    conn = session.connection()
    for (state, code, response, next_attempt_at), ids in alike.items():
        params = {
            "owner": owner,
            "state": state,
            "code": code,
            "response": response,
            "now": now,
            "next_attempt_at": next_attempt_at,
            "finished_at": now if state in FINAL_RECIPIENT_STATES else None,
        }
        if direct(conn):
            rows = _RECORD_SQLITE.returning(conn, [{**params, "ids_json": json.dumps(ids)}])
            kept.update(rid for (rid,) in rows)
        else:
            kept.update(conn.execute(_RECORD, {**params, "ids": ids}).scalars())
    return kept


def remember_domains(
    session: Session,
    domains: Iterable[str],
    now: datetime,
    *,
    known: AbstractSet[str] = frozenset(),
) -> None:
    """Note recipient domains just delivered to; those already known stay as they were
    (`known`: what the caller has already read back, so the usual case writes nothing)."""
    rows = [
        {"domain": d, "first_delivered_at": now} for d in sorted(set(domains)) if d not in known
    ]
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert_for = postgresql_insert if dialect == "postgresql" else sqlite_insert
    session.execute(insert_for(KnownDomain).on_conflict_do_nothing(), rows)


def known_domains(session: Session) -> list[str]:
    return list(session.scalars(select(KnownDomain.domain)))


def _finish_statement(which: ColumnElement[bool]) -> Update:
    # The table in states.py allows exactly these two moves out of QUEUED here.
    check_message(MessageState.QUEUED, MessageState.DELIVERED)
    check_message(MessageState.QUEUED, MessageState.BOUNCED)
    unfinished = (
        select(_recipients.id)
        .where(
            _recipients.message_id == _messages.id,
            _recipients.state.not_in(_each(_recipients.state, FINAL_RECIPIENT_STATES)),
        )
        .exists()
    )
    any_delivered = (
        select(_recipients.id)
        .where(
            _recipients.message_id == _messages.id,
            _recipients.state == RecipientState.DELIVERED,
        )
        .exists()
    )
    return (
        update(_MESSAGES)
        .where(
            which,
            _messages.state == MessageState.QUEUED,
            ~unfinished,
        )
        .values(
            state=case(
                (any_delivered, MessageState.DELIVERED.value), else_=MessageState.BOUNCED.value
            ),
            updated_at=bindparam("now"),
            finished_at=bindparam("now"),
        )
        .returning(_messages.id, _messages.state)
    )


_FINISH = _finish_statement(_messages.id.in_(bindparam("ids", expanding=True)))
_FINISH_SQLITE = Prepared(_finish_statement(_in_json(_messages.id)))


def finish_messages(
    session: Session, message_ids: Iterable[str], now: datetime
) -> list[tuple[str, MessageState]]:
    """Move queued messages whose recipients are all final to delivered (at least one
    delivered) or bounced, in one statement, and say which moved."""
    ids = list(dict.fromkeys(message_ids))  # once each, in the order given
    if not ids:
        return []
    conn = session.connection()
    if direct(conn):
        moved = _FINISH_SQLITE.returning(conn, [{"ids_json": json.dumps(ids), "now": now}])
    else:
        moved = [tuple(row) for row in conn.execute(_FINISH, {"ids": ids, "now": now})]
    return [(mid, MessageState(state)) for mid, state in moved]


async def extend_leases(
    session: AsyncSession, owner: str, ids: Sequence[int], until: datetime
) -> int:
    """Push back the expiry of those of these leases this worker still holds."""
    result = await session.execute(
        update(Recipient)
        .where(Recipient.id.in_(ids), Recipient.lease_owner == owner)
        .values(lease_expires_at=until)
    )
    return int(getattr(result, "rowcount", 0))


async def return_leases(session: AsyncSession, owner: str) -> int:
    """Give back everything this worker holds, so another instance need not wait."""
    result = await session.execute(
        update(Recipient)
        .where(Recipient.lease_owner == owner)
        .values(lease_owner=None, lease_expires_at=None)
    )
    return int(getattr(result, "rowcount", 0))


async def hold_message(
    session: AsyncSession,
    message_id: str,
    reason: str,
    now: datetime,
    *,
    ours: Sequence[int] = (),
    owner: str | None = None,
    expires_at: datetime | None = None,
) -> bool:
    """Queued → held, its unfinished recipients back to waiting (fail closed).

    `ours`: the recipients of the claim that holds it, as far as `owner` (that claim's
    worker) still holds their leases; one lost to another worker, which may be sending
    it now, is that worker's to record. Recipients any other claim is
    sending to right now (of this instance too: a message's domains are claimed
    separately) keep their lease, so that send's result is recorded rather than
    dropped; claims skip recipients of any message that is not queued, so nothing
    more leaves until someone approves it.
    """
    if ours and owner is None:  # `lease_owner == None` would match none of them
        raise ValueError("hold_message: `ours` needs the `owner` whose leases they are")
    mine = and_(Recipient.id.in_(ours), Recipient.lease_owner == owner)
    message = await session.get(Message, message_id, with_for_update=True)
    if message is not None and message.state is MessageState.HELD and ours:
        # Held already, by another claim of the message (one per domain) that failed
        # first: this claim's recipients wait for the decision too, instead of staying
        # due under a lease that only runs out.
        await session.execute(_to_waiting(message_id, now, mine))
        return False
    if message is None or message.state is not MessageState.QUEUED:
        return False
    message.state = check_message(message.state, MessageState.HELD)
    message.rule = reason
    message.updated_at = now
    message.release_at = expires_at  # a hold's expiry, not the old end of a delay
    not_in_flight = or_(
        Recipient.lease_owner.is_(None),
        mine,
        Recipient.lease_expires_at < now,
    )
    await session.execute(_to_waiting(message_id, now, not_in_flight))
    return True


def _to_waiting(message_id: str, now: datetime, which: ColumnElement[bool]) -> Update:
    """Those of a message's due recipients that `which` picks, back to waiting."""
    return (
        update(Recipient)
        .where(
            Recipient.message_id == message_id,
            Recipient.state.in_(DUE_RECIPIENT_STATES),
            which,
        )
        .values(
            state=RecipientState.WAITING,
            next_attempt_at=None,
            lease_owner=None,
            lease_expires_at=None,
            updated_at=now,
        )
    )


async def due_delays(session: AsyncSession, now: datetime, limit: int = 100) -> list[str]:
    rows = await session.scalars(
        select(Message.id)
        .where(and_(Message.state == MessageState.DELAYED, Message.release_at <= now))
        .order_by(Message.release_at)
        .limit(limit)
    )
    return list(rows.all())


async def queue_depth(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(Message.state, func.count()).group_by(Message.state))
    return {str(state): count for state, count in rows.all()}
