"""Intake: normalise, inspect, persist, then answer. Accepted means durable.

The 250 is returned only after the message, its envelope, its verdict and one row
per recipient are committed. Any failure on the way answers 451 and stores nothing
half-written: the transaction rolls back as a whole.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gateway.audit import AuditLog
from gateway.committer import GroupCommitter, Handoff
from gateway.ids import new_id
from policies.engine import Inspection, Policy, inspect
from policies.envelope import Envelope
from policies.verdict import Action
from quarantine.db import Store
from quarantine.repository import NewMessage
from quarantine.states import MessageState

log = logging.getLogger(__name__)

# Above this size, parsing and inspection run in a worker thread, so that one large
# message does not stall every other SMTP session (25 MB costs ~2 s of CPU).
OFFLOAD_BYTES = 128 * 1024
# A small message can still be expensive to parse: the email package costs ~0.2 ms per
# MIME part and ~0.6 ms per nesting level, so 1,000 nested parts in 67 KB stalled every
# session for 0.7 s. Many boundary-like lines send a message to the thread as well.
OFFLOAD_DELIMITERS = 64
_BARE = re.compile(rb"\r\n|\r|\n")
NORMALIZE_WINDOW = 64 * 1024
TEMPORARY_FAILURE = "451 4.3.0 Temporary failure storing the message; please try again later"


def has_bare_newlines(data: bytes) -> bool:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


def normalize_newlines(data: bytes, window: int = NORMALIZE_WINDOW) -> bytes:
    """Bare CR or LF becomes CRLF (RFC 5321 §2.3.8), as Postfix's
    `smtpd_forbid_bare_newline = normalize` does: what is inspected is exactly what
    is forwarded, and a bare `\\n.\\r\\n` can never end the message at the next hop.

    Rewritten `window` bytes at a time into one buffer: a substitution over the whole
    message keeps a piece per line (~1.5x the message) before joining them. Each window
    ends just after a LF, so no CRLF is ever split between two windows."""
    if not has_bare_newlines(data):
        return data
    out = io.BytesIO()
    start = 0
    while start < len(data):
        cut = data.find(b"\n", start + window)
        end = len(data) if cut < 0 else cut + 1
        out.write(_BARE.sub(b"\r\n", data[start:end]))
        start = end
    return out.getvalue()


@dataclass(frozen=True, slots=True)
class Submission:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    client_address: str
    helo: str | None = None
    sender_user: str | None = None
    sender_groups: tuple[str, ...] = ()


class Intake:
    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        policy: Callable[[], Policy],
        clock: Callable[[], datetime],
        *,
        reject_bare_newlines: bool = False,
        hold_expiry: Callable[[datetime], datetime] | None = None,
        on_queued: Callable[[], None] | None = None,
        known_domains: Callable[[], frozenset[str]] = frozenset,
        on_held: Callable[[str], Coroutine[Any, Any, None]] | None = None,
        handoff: Handoff | None = None,
    ) -> None:
        self._committer = GroupCommitter(store, handoff=handoff)
        self._audit = audit
        self._policy = policy
        self._clock = clock
        self._reject_bare = reject_bare_newlines
        self._hold_expiry = hold_expiry
        self._on_queued = on_queued
        self._known_domains = known_domains
        self._on_held = on_held
        self._notifying: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        await self._committer.close()
        if self._notifying:  # notices of held mail being queued: let them finish
            await asyncio.wait(set(self._notifying), timeout=5)

    async def submit(self, submission: Submission) -> str:
        """Return the SMTP reply for one DATA. Never raises, never 250s a failure."""
        try:
            return await self._submit(submission)
        except Exception:
            log.exception("intake failed for a message from %s", submission.client_address)
            self._safe_audit("message.tempfail", submission, reason="store-error")
            return TEMPORARY_FAILURE

    async def _submit(self, submission: Submission) -> str:
        data = submission.data
        large = len(data) >= OFFLOAD_BYTES
        # Counting and rewriting line ends of 25 MB takes ~0.3 s: not on the loop.
        bare = (
            await asyncio.to_thread(has_bare_newlines, data) if large else has_bare_newlines(data)
        )
        if bare:
            if self._reject_bare:
                self._audit.emit(
                    "message.refused",
                    actor=_actor(submission),
                    reason="bare-newline",
                    client=submission.client_address,
                )
                return "550 5.6.0 Message contains a bare CR or LF (RFC 5321 section 2.3.8)"
            data = (
                await asyncio.to_thread(normalize_newlines, data)
                if large
                else (normalize_newlines(data))
            )
        now = self._clock()
        envelope = Envelope(
            mail_from=submission.mail_from,
            rcpt_tos=submission.rcpt_tos,
            sender_user=submission.sender_user,
            sender_groups=submission.sender_groups,
        )
        result = await self._inspect(data, envelope, now)
        verdict = result.verdict
        if verdict.action is Action.REFUSE:
            return self._refuse(submission, result)
        message_id = new_id()
        state, release_at = self._placement(result, now)
        handed_over = await self._committer.commit(
            NewMessage(
                id=message_id,
                mail_from=submission.mail_from,
                rcpt_tos=submission.rcpt_tos,
                raw=data,
                state=state,
                verdict=verdict.model_dump(mode="json"),
                subject=result.subject,
                rule=verdict.rule,
                attachments=[_attachment_json(a) for a in result.attachments],
                sender_user=submission.sender_user,
                client_address=submission.client_address,
                helo=submission.helo,
                release_at=release_at,
            ),
            now,
        )
        self._audit.emit(
            "message.accepted",
            id=message_id,
            actor=_actor(submission),
            mail_from=submission.mail_from,
            rcpt=list(submission.rcpt_tos),
            size=len(data),
            state=state.value,
            rule=verdict.rule,
            client=submission.client_address,
        )
        if state is MessageState.QUEUED and not handed_over and self._on_queued is not None:
            self._on_queued()
        if state is MessageState.HELD and self._on_held is not None:
            # After the commit and off the reply's path: the 250 does not wait for it.
            task = asyncio.get_running_loop().create_task(self._on_held(message_id))
            self._notifying.add(task)  # the loop keeps only a weak reference
            task.add_done_callback(self._notifying.discard)
        return f"250 2.0.0 Ok: queued as {message_id}"

    async def _inspect(self, data: bytes, envelope: Envelope, now: datetime) -> Inspection:
        policy, known = self._policy(), self._known_domains()
        if len(data) < OFFLOAD_BYTES and data.count(b"\n--") <= OFFLOAD_DELIMITERS:
            return inspect(data, envelope, policy, now, known)
        return await asyncio.to_thread(inspect, data, envelope, policy, now, known)

    def _placement(self, result: Inspection, now: datetime) -> tuple[MessageState, datetime | None]:
        verdict = result.verdict
        match verdict.action:
            case Action.DELIVER:
                return MessageState.QUEUED, None
            case Action.DELAY:
                return MessageState.DELAYED, now + timedelta(seconds=verdict.delay_seconds or 0)
            case Action.HOLD:
                return MessageState.HELD, self._hold_expiry(now) if self._hold_expiry else None
            case Action.REFUSE:
                raise AssertionError("refused messages are never stored")

    def _refuse(self, submission: Submission, result: Inspection) -> str:
        verdict = result.verdict
        self._audit.emit(
            "message.refused",
            actor=_actor(submission),
            mail_from=submission.mail_from,
            rcpt=list(submission.rcpt_tos),
            rule=verdict.rule,
            client=submission.client_address,
            trace=[t.model_dump(mode="json") for t in verdict.trace if t.matched],
        )
        return f"550 5.7.1 {verdict.smtp_reason()}"

    def _safe_audit(self, event: str, submission: Submission, **details: str) -> None:
        try:
            self._audit.emit(
                event,
                actor=_actor(submission),
                mail_from=submission.mail_from,
                client=submission.client_address,
                **details,
            )
        except Exception:
            log.exception("audit write failed")


def _actor(submission: Submission) -> str:
    return submission.sender_user or f"client:{submission.client_address}"


def _attachment_json(attachment: object) -> dict[str, object]:
    fields = getattr(attachment, "__slots__", None) or vars(attachment)
    return {name: _plain(getattr(attachment, name)) for name in fields}


def _plain(value: object) -> object:
    if isinstance(value, tuple | list | frozenset | set):
        return [_plain(v) for v in value]
    return value
