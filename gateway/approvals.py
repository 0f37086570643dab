"""The approval workflow: who may see and decide a message, and the decisions themselves.

HTTP handlers call one function here each. A decision is validated and recorded, and
the message released or ended, in one transaction on the message row locked
`FOR UPDATE`, so two approvers acting at once produce one release and the second
learns who acted first. Audit events, the delivery wake-up and `on_decision` (the hook
for notices by mail) run after the commit, for decisions that really happened.

Errors, mapped to HTTP by `gateway.api`:

    ApprovalError
    ├── NotFound    404: no such message, or one this person may not see
    ├── Forbidden   403: visible, but this person may not do this (four-eyes, read-only)
    └── Conflict    409: the message is no longer in a state that allows it
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Any, Literal, Protocol

from gateway.audit import AuditLog
from gateway.config import ApprovalConfig, OnExpire
from policies.detectors import detect
from policies.detectors import email_addresses as email_detector
from policies.text import normalize
from quarantine import approvals as qa
from quarantine import repository as repo
from quarantine.accounts import Role
from quarantine.db import Store
from quarantine.models import Approval, Message, Recipient
from quarantine.states import MessageState

log = logging.getLogger(__name__)


class ApprovalError(Exception):
    """A request the workflow refuses; the message says why, for the person asking."""


class NotFound(ApprovalError):
    pass


class Forbidden(ApprovalError):
    pass


class Conflict(ApprovalError):
    pass


PENDING = frozenset({MessageState.HELD, MessageState.DELAYED})
DECIDING_ROLES = frozenset({Role.APPROVER, Role.ADMIN})
UNMASKING_ROLES = frozenset({Role.APPROVER, Role.ADMIN, Role.AUDITOR})
SEES_ALL = frozenset({Role.ADMIN, Role.AUDITOR})
MASK = "****"
PREVIEW_CHARS = 4000


@dataclass(frozen=True, slots=True)
class Principal:
    """The person behind a request's token."""

    name: str
    role: Role
    groups: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    token_prefix: str = ""

    @property
    def principals(self) -> tuple[str, ...]:
        """How rules may name this person as an approver."""
        return (*(f"group:{g}" for g in self.groups), f"user:{self.name}")


@dataclass(frozen=True, slots=True)
class Decision:
    """What happened to a message, for `on_decision` (notices to senders and approvers)."""

    message_id: str
    outcome: str  # approved | released | rejected | cancelled | expired
    actor: str
    reason: str | None = None


OnDecision = Callable[[Decision], Awaitable[None] | None]


@dataclass(frozen=True, slots=True)
class MessageView:
    message: Message
    recipients: Sequence[Recipient]
    decisions: Sequence[Approval]
    deciders: tuple[str, ...]
    preview: str | None = None
    masked: bool = True


@dataclass(frozen=True, slots=True)
class Page:
    items: list[MessageView]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Result:
    message_id: str
    state: MessageState
    approvals: int
    needed: int
    released: bool = False
    already: bool = False  # the same person asked again: nothing new was recorded
    decided_by: tuple[str, ...] = field(default=())


# --- who may see and decide (pure) ------------------------------------------------


def is_sender(user: Principal, message: Message) -> bool:
    """Sent by this person: authenticated as them, or from one of their addresses."""
    return message.sender_user == user.name or message.mail_from.lower() in user.emails


def deciders(message: Message, config: ApprovalConfig, now: datetime) -> tuple[str, ...]:
    """Who decides a held or delayed message: the rule's approvers, else the defaults,
    plus `escalate_to` once it has waited `escalate_after`."""
    verdict: Mapping[str, Any] = message.verdict or {}
    held_at_delivery = message.state is MessageState.HELD  # e.g. protection failed
    if verdict.get("action") not in ("hold", "delay") and not held_at_delivery:
        return ()
    named = tuple(str(a) for a in verdict.get("approvers") or ()) or config.default_approvers
    escalated = (
        config.escalate_after is not None
        and verdict.get("action") == "hold"
        and now - message.created_at >= config.escalate_after
    )
    if escalated:
        named += tuple(g for g in config.escalate_to if g not in named)
    return named


def may_see(user: Principal, message: Message, config: ApprovalConfig, now: datetime) -> bool:
    if user.role in SEES_ALL or is_sender(user, message):
        return True
    if user.role is not Role.APPROVER:
        return False
    return bool(set(user.principals) & set(deciders(message, config, now)))


def scope_for(user: Principal, config: ApprovalConfig, now: datetime) -> qa.Scope:
    """The SQL pre-filter matching `may_see` (a superset; each row is checked after)."""
    if user.role in SEES_ALL:
        return qa.Scope(everything=True)
    own = qa.Scope(user=user.name, emails=user.emails)
    if user.role is not Role.APPROVER:
        return own
    mine = set(user.principals)
    escalates = config.escalate_after is not None and bool(mine & set(config.escalate_to))
    return qa.Scope(
        user=user.name,
        emails=user.emails,
        principals=user.principals,
        unassigned=bool(mine & set(config.default_approvers)),
        escalated_before=now - config.escalate_after
        if escalates and config.escalate_after is not None
        else None,
    )


def sender_may_release(user: Principal, message: Message) -> bool:
    """The sender's own delayed message, whose rules all let the sender end the delay
    (`sender_may_release`). Never a held message: the caller also checks the state,
    since a delayed message can be held later (protection failed at delivery)."""
    verdict: Mapping[str, Any] = message.verdict or {}
    return (
        is_sender(user, message)
        and verdict.get("action") == "delay"
        and verdict.get("sender_may_release") is True
    )


def needed_approvals(message: Message) -> int:
    value = (message.verdict or {}).get("min_approvals", 1)
    return max(1, int(value)) if isinstance(value, int) else 1


# --- the text preview ---------------------------------------------------------------

_NUMBER_RUN = re.compile(r"[\d+(][\d ()+-]{8,}\d")
_ADDRESS = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


def mask_personal_data(text: str) -> str:
    """Card numbers, My Numbers and phone numbers become `****`; addresses keep only
    their first letter and domain. The text is NFKC-normalised first, so full-width
    digits are caught too."""
    text = normalize(text)
    text = _NUMBER_RUN.sub(lambda m: MASK if detect(m.group()) else m.group(), text)
    return _ADDRESS.sub(lambda m: email_detector.mask(m.group()), text)


def preview_text(raw: bytes, limit: int = PREVIEW_CHARS) -> str:
    """The first text part (plain, else HTML reduced to text), at most `limit` chars."""
    from policies.text import html_to_text

    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    try:
        body = parsed.get_body(preferencelist=("plain", "html"))
    except Exception:
        return ""
    if body is None:
        return ""
    try:
        text = str(body.get_content())
    except Exception:
        payload = body.get_payload(decode=True)
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
    if body.get_content_subtype() == "html":
        text = html_to_text(text)
    return text[:limit]


def masked_preview(raw: bytes, unmask: bool) -> str:
    text = preview_text(raw)
    return text if unmask else mask_personal_data(text)


# --- the service ------------------------------------------------------------------


class Approvals:
    def __init__(
        self,
        store: Store,
        audit: AuditLog | None,
        config: ApprovalConfig,
        clock: Callable[[], datetime],
        *,
        wake: Callable[[], None] | None = None,
        on_decision: OnDecision | None = None,
    ) -> None:
        self._store = store
        self._audit = audit
        self.config = config
        self.clock = clock
        self._wake = wake
        self._on_decision = on_decision

    # reads

    async def list_messages(
        self, user: Principal, filters: qa.Filters, *, after: str | None, limit: int
    ) -> Page:
        """One page, oldest first. SQL narrows by a coarse scope; `may_see` decides.
        A page may come back short with a cursor when many rows were filtered out."""
        now = self.clock()
        scope = scope_for(user, self.config, now)
        kept: list[Message] = []
        cursor = after
        # Admins see every row the SQL returns; others may see fewer than it finds.
        size = limit if scope.everything else limit * 2
        async with self._store.read() as session:
            for _ in range(20):
                batch = await qa.page_of_messages(session, filters, scope, after=cursor, limit=size)
                for message in batch:
                    cursor = message.id
                    if may_see(user, message, self.config, now):
                        kept.append(message)
                        if len(kept) == limit:
                            break
                if len(kept) == limit or len(batch) < size:
                    break
            more = len(kept) == limit or (len(batch) == size)
            ids = [m.id for m in kept]
            recipients = await qa.recipients_of(session, ids)
            decisions = await qa.decisions_of(session, ids)
        items = [
            MessageView(m, recipients[m.id], decisions[m.id], deciders(m, self.config, now))
            for m in kept
        ]
        return Page(items, cursor if more else None)

    async def view(
        self, user: Principal, message_id: str, *, unmask: bool, client: str
    ) -> MessageView:
        if unmask and user.role not in UNMASKING_ROLES:
            # Checked after visibility, so a sender probing ids still sees 404.
            await self._visible(user, message_id)
            raise Forbidden("unmasking personal data needs the approver, admin or auditor role")
        message = await self._visible(user, message_id)
        async with self._store.read() as session:
            recipients = (await qa.recipients_of(session, [message_id]))[message_id]
            decisions = (await qa.decisions_of(session, [message_id]))[message_id]
            raw = await repo.load_raw(session, message_id)
        preview = await asyncio.to_thread(masked_preview, raw, unmask) if raw else None
        self._emit("message.viewed", message_id, user, client=client, unmasked=unmask)
        return MessageView(
            message,
            recipients,
            decisions,
            deciders(message, self.config, self.clock()),
            preview,
            masked=not unmask,
        )

    async def raw(self, user: Principal, message_id: str, *, client: str) -> bytes:
        message = await self._visible(user, message_id)
        if user.role not in UNMASKING_ROLES:
            raise Forbidden("downloading the original needs the approver, admin or auditor role")
        async with self._store.read() as session:
            raw = await repo.load_raw(session, message_id)
        if raw is None:
            raise NotFound("the message body was purged by the retention policy")
        self._emit("message.downloaded", message.id, user, client=client, size=len(raw))
        return raw

    async def _visible(self, user: Principal, message_id: str) -> Message:
        async with self._store.read() as session:
            message = await qa.get_message(session, message_id)
        return self._check_visible(user, message)

    def _check_visible(self, user: Principal, message: Message | None) -> Message:
        if message is None or not may_see(user, message, self.config, self.clock()):
            raise NotFound("no such message")
        return message

    # decisions

    async def approve(self, user: Principal, message_id: str, comment: str | None) -> Result:
        now = self.clock()
        async with self._store.transaction() as session:
            message = self._check_visible(user, await qa.lock_message(session, message_id))
            if is_sender(user, message):
                raise Forbidden("four-eyes: you sent this message, so another approver must decide")
            self._check_role(user, "approve")
            votes = await qa.votes_of(session, message_id)
            approvers = _unique(v.user for v in votes if v.decision == qa.APPROVE)
            needed = needed_approvals(message)
            if user.name in approvers:
                return Result(message_id, message.state, len(approvers), needed, already=True)
            if message.state is not MessageState.HELD:
                raise Conflict(_already(message, votes))
            await qa.add_vote(
                session, message_id, user=user.name, decision=qa.APPROVE, comment=comment, now=now
            )
            approvers = (*approvers, user.name)
            released = len(approvers) >= needed
            if released:
                await qa.release_locked(session, message, now)
        self._emit("message.approved", message_id, user, approvals=len(approvers), needed=needed)
        if released:
            await self._released(message_id, user.name, "approved")
        state = MessageState.QUEUED if released else MessageState.HELD
        return Result(message_id, state, len(approvers), needed, released, decided_by=approvers)

    async def reject(self, user: Principal, message_id: str, reason: str) -> Result:
        now = self.clock()
        async with self._store.transaction() as session:
            message = self._check_visible(user, await qa.lock_message(session, message_id))
            self._check_role(user, "reject")
            if message.state is not MessageState.HELD:
                raise Conflict(_already(message, await qa.votes_of(session, message_id)))
            await qa.add_vote(
                session, message_id, user=user.name, decision=qa.REJECT, comment=reason, now=now
            )
            await qa.end_message(session, message, MessageState.REJECTED, now)
        self._emit("message.rejected", message_id, user, reason=reason)
        await self._decided(Decision(message_id, "rejected", user.name, reason))
        return Result(message_id, MessageState.REJECTED, 0, needed_approvals(message))

    async def cancel(self, user: Principal, message_id: str) -> Result:
        now = self.clock()
        async with self._store.transaction() as session:
            message = self._check_visible(user, await qa.lock_message(session, message_id))
            if not is_sender(user, message) and user.role is not Role.ADMIN:
                raise Forbidden("only the sender (or an admin) can cancel a message")
            if message.state is not MessageState.DELAYED:
                raise Conflict(f"only a delayed message can be cancelled; it is {message.state}")
            if message.release_at is not None and now >= message.release_at:
                raise Conflict(f"the delay window ended at {message.release_at.isoformat()}")
            await qa.end_message(session, message, MessageState.CANCELLED, now)
        self._emit("message.cancelled", message_id, user)
        await self._decided(Decision(message_id, "cancelled", user.name))
        return Result(message_id, MessageState.CANCELLED, 0, needed_approvals(message))

    async def release_now(self, user: Principal, message_id: str) -> Result:
        now = self.clock()
        async with self._store.transaction() as session:
            message = self._check_visible(user, await qa.lock_message(session, message_id))
            if user.role not in DECIDING_ROLES and not sender_may_release(user, message):
                raise Forbidden(
                    "to release a message now needs the approver or admin role, "
                    "or a rule that lets its sender do it"
                )
            if message.state is not MessageState.DELAYED:
                raise Conflict(
                    f"only a delayed message can be released now; it is {message.state}"
                    + ("; approve it instead" if message.state is MessageState.HELD else "")
                )
            await qa.release_locked(session, message, now)
        await self._released(message_id, user.name, "released-now")
        return Result(message_id, MessageState.QUEUED, 0, 1, released=True)

    def _check_role(self, user: Principal, verb: str) -> None:
        if user.role not in DECIDING_ROLES:
            raise Forbidden(f"to {verb} a message needs the approver or admin role")

    async def _released(self, message_id: str, actor: str, reason: str) -> None:
        if self._audit is not None:
            self._audit.emit("message.released", id=message_id, actor=actor, reason=reason)
        if self._wake is not None:
            self._wake()
        await self._decided(Decision(message_id, "released", actor, reason))

    async def _decided(self, decision: Decision) -> None:
        await notify(self._on_decision, decision)

    def _emit(self, event: str, message_id: str, user: Principal, **details: Any) -> None:
        if self._audit is not None:
            self._audit.emit(event, id=message_id, actor=user.name, role=user.role.value, **details)


def _unique(names: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def _already(message: Message, votes: Sequence[qa.Vote]) -> str:
    """The 409 text: what happened and who did it first."""
    if message.state is MessageState.DELAYED:
        return "the message is delayed, not held: it needs no approval (see release-now)"
    by = {
        MessageState.REJECTED: [v for v in votes if v.decision == qa.REJECT],
        MessageState.EXPIRED: [],
    }.get(message.state, [v for v in votes if v.decision == qa.APPROVE])
    who = ", ".join(f"{d.user} at {d.at.isoformat()}" for d in by)
    return f"the message is already {message.state}" + (f" (by {who})" if who else "")


async def notify(hook: OnDecision | None, decision: Decision) -> None:
    """Run the notices hook. A failing hook is logged: the decision is already made."""
    if hook is None:
        return
    try:
        result = hook(decision)
        if result is not None:
            await result
    except Exception:
        log.exception("on_decision hook failed for %s", decision.message_id)


# --- expiry -------------------------------------------------------------------------


async def expire_holds(
    store: Store,
    now: datetime,
    config: ApprovalConfig,
    *,
    audit: AuditLog | None = None,
    wake: Callable[[], None] | None = None,
    on_decision: OnDecision | None = None,
) -> list[Decision]:
    """Held messages past `release_at` (set at intake to `expire_after`) are expired or
    released, as `on_expire` says. It works from the store's timestamps only, so a
    restart, or several instances running it, changes nothing."""
    outcome = "released" if config.on_expire is OnExpire.RELEASE else "expired"
    done: list[Decision] = []
    async with store.transaction() as session:
        for message_id in await qa.expired_holds(session, now):
            message = await qa.lock_message(session, message_id)
            if message is None or message.state is not MessageState.HELD:
                continue  # decided by someone else since the query
            if config.on_expire is OnExpire.RELEASE:
                await qa.release_locked(session, message, now)
            else:
                await qa.end_message(session, message, MessageState.EXPIRED, now)
            done.append(Decision(message_id, outcome, "system", "expired"))
    for decision in done:
        if audit is not None:
            audit.emit("message.expired", id=decision.message_id, outcome=outcome)
        await notify(on_decision, decision)
    if done and outcome == "released" and wake is not None:
        wake()
    return done


# --- reminders and escalation -------------------------------------------------------


class HoldNotices(Protocol):
    """Who mails the reminders (`gateway.workflow_notices.WorkflowNotices`)."""

    async def reminder(self, message_id: str) -> None: ...

    async def escalation(self, message_id: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Nudge:
    message_id: str
    kind: Literal["reminder", "escalation"]


async def remind_holds(
    store: Store,
    now: datetime,
    config: ApprovalConfig,
    notices: HoldNotices | None,
    *,
    audit: AuditLog | None = None,
) -> list[Nudge]:
    """Remind the deciders of mail held longer than `remind_after`, again every
    `remind_after`; tell the `escalate_to` groups, once, of mail held longer than
    `escalate_after`.

    Each reminder is recorded in the store before it is mailed, from the store's
    timestamps, so a restart or a second instance never repeats one within the
    interval. A crash between the two loses that reminder; the next comes one
    interval later. Escalation applies to mail held by a rule, as in `deciders`.
    """
    nudges: list[Nudge] = []
    if config.remind_after is None and not (config.escalate_after and config.escalate_to):
        return nudges
    async with store.transaction() as session:
        if config.remind_after is not None:
            before = now - config.remind_after
            for message_id in await qa.due_reminders(session, before):
                if await qa.claim_reminder(session, message_id, now, before) is not None:
                    nudges.append(Nudge(message_id, "reminder"))
        if config.escalate_after is not None and config.escalate_to:
            for message_id in await qa.due_escalations(session, now - config.escalate_after):
                message = await qa.claim_escalation(session, message_id, now)
                if message is not None and (message.verdict or {}).get("action") == "hold":
                    nudges.append(Nudge(message_id, "escalation"))
    for nudge in nudges:
        if audit is not None:
            event = "message.reminded" if nudge.kind == "reminder" else "message.escalated"
            audit.emit(event, id=nudge.message_id)
        if notices is not None:
            if nudge.kind == "reminder":
                await notices.reminder(nudge.message_id)
            else:
                await notices.escalation(nudge.message_id)
    return nudges


async def expiry_loop(
    store: Store,
    config: ApprovalConfig,
    clock: Callable[[], datetime],
    *,
    audit: AuditLog | None = None,
    wake: Callable[[], None] | None = None,
    on_decision: OnDecision | None = None,
    notices: HoldNotices | None = None,
    interval: float = 30.0,
) -> None:
    """Every `interval` seconds until cancelled, expire what is due, then send the
    reminders that are due (`notices`, if given, mails them); never dies."""
    while True:
        now = clock()
        try:
            await expire_holds(store, now, config, audit=audit, wake=wake, on_decision=on_decision)
        except Exception:
            log.exception("expiring holds failed; retrying in %s s", interval)
        try:
            await remind_holds(store, now, config, notices, audit=audit)
        except Exception:
            log.exception("reminding of held mail failed; retrying in %s s", interval)
        await asyncio.sleep(interval)
