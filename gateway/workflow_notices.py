"""Mail about held messages: to the approvers when mail is held (with a link) and again
when it has waited `remind_after`, to the `escalate_to` groups once it has waited
`escalate_after`, and to the sender when it is held, approved, released, rejected or
expired.

Notices are ordinary messages queued in the store from the null sender, so they are
durable, retried and audited like any other mail, and never bounce.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from gateway.approvals import Decision, deciders
from gateway.audit import AuditLog
from gateway.config import Config
from gateway.credentials import Credentials
from gateway.ids import new_id
from gateway.notices import build_notice
from policies.verdict import Verdict
from quarantine import repository as repo
from quarantine.db import Store
from quarantine.models import Message
from quarantine.repository import NewMessage
from quarantine.states import MessageState

log = logging.getLogger(__name__)

OUTCOMES = {
    "approved": ("承認されました", "was approved and is being delivered"),
    "released": ("送信されました", "was released for delivery"),
    "rejected": ("却下されました", "was rejected"),
    "expired": ("期限切れになりました", "expired without a decision"),
    "cancelled": ("取り消されました", "was cancelled"),
}


@dataclass(frozen=True, slots=True)
class Notice:
    """One notice built and ready to store: the mail, and what it is about."""

    new: NewMessage
    original: str


def _hours(waited: timedelta) -> str:
    hours = int(waited.total_seconds() // 3600)
    return f"{hours // 24}日 {hours % 24}時間 / {hours // 24} d {hours % 24} h"


class WorkflowNotices:
    """Notices are built before the write transaction and stored in one: on SQLite
    the write lock is shared with approvals and delivery, so it is held only for the
    inserts. Decision notices are queued in the background and grouped: decisions
    made while one group is being stored go out together in the next."""

    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        config: Config,
        credentials: Credentials,
        clock: Callable[[], datetime],
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._config = config
        self._credentials = credentials
        self._clock = clock
        self._wake = wake
        self._decisions: list[Decision] = []
        self._drainer: asyncio.Task[None] | None = None

    async def held(self, message_id: str) -> None:
        """Tell the deciders (by mail) and the sender that a message waits for a decision."""
        try:
            await self._held(message_id)
        except Exception:
            log.exception("could not queue the held notices for %s", message_id)

    async def _held(self, message_id: str) -> None:
        now = self._clock()
        message = await self._load(message_id)
        if message is None or message.state is not MessageState.HELD:
            return
        who = deciders(message, self._config.approval, now)
        reason = str(message.verdict.get("reason") or message.rule or "")
        notices = []
        approvers = self._addresses(who)
        if approvers:
            notices.append(
                self._build(
                    approvers,
                    message,
                    now,
                    "承認待ちのメール / Mail waiting for your approval",
                    f"送信者 / From: {message.mail_from}\n"
                    f"件名 / Subject: {message.subject or ''}\n"
                    f"理由 / Held by: {message.rule}: {reason}\n\n"
                    f"確認と承認 / Review and approve:\n{self._link(message_id)}\n",
                )
            )
        if message.mail_from and message.kind == "message":
            notices.append(
                self._build(
                    [message.mail_from],
                    message,
                    now,
                    "メールを保留しました / Your message is held",
                    f"件名 / Subject: {message.subject or ''}\n"
                    f"理由 / Why: {message.rule}: {reason}\n"
                    f"承認者 / Decided by: {', '.join(who) or '-'}\n",
                )
            )
        await self._store_all(notices, now)

    async def reminder(self, message_id: str) -> None:
        """Remind the deciders of a message that still waits (`[approval].remind_after`)."""
        now = self._clock()
        message = await self._load(message_id)
        if message is None or message.state is not MessageState.HELD:
            return
        to = self._addresses(deciders(message, self._config.approval, now))
        subject = "まだ承認待ちのメール / Reminder: mail waiting for your approval"
        await self._store_all(self._waiting(to, message, now, subject), now)

    async def escalation(self, message_id: str) -> None:
        """Tell the `escalate_to` groups that a message now waits for them too."""
        now = self._clock()
        message = await self._load(message_id)
        if message is None or message.state is not MessageState.HELD:
            return
        to = self._addresses(self._config.approval.escalate_to)
        subject = "承認待ちのメールが回ってきました / Escalated: mail waiting for approval"
        await self._store_all(self._waiting(to, message, now, subject), now)

    def _waiting(
        self, to: list[str], message: Message, now: datetime, subject: str
    ) -> list[Notice]:
        if not to:
            return []
        waited = _hours(now - message.created_at)
        reason = str(message.verdict.get("reason") or message.rule or "")
        return [
            self._build(
                to,
                message,
                now,
                subject,
                f"送信者 / From: {message.mail_from}\n"
                f"件名 / Subject: {message.subject or ''}\n"
                f"理由 / Held by: {message.rule}: {reason}\n"
                f"待ち時間 / Waiting for: {waited}\n\n"
                f"確認と承認 / Review and approve:\n{self._link(message.id)}\n",
            )
        ]

    def decided(self, decision: Decision) -> None:
        """The `on_decision` hook: tell the sender what became of their message.

        Queued in the background: the approver's answer does not wait for the notice.
        """
        self._decisions.append(decision)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def drain(self) -> None:
        """Wait until every decision notice asked for so far is stored."""
        while self._drainer is not None and not self._drainer.done():
            await asyncio.shield(self._drainer)

    async def _drain(self) -> None:
        while self._decisions:
            batch, self._decisions = self._decisions, []
            try:
                await self._queue_decisions(batch)
            except Exception:
                ids = ", ".join(d.message_id for d in batch)
                log.exception("could not queue the decision notices for %s", ids)

    async def _queue_decisions(self, decisions: Sequence[Decision]) -> None:
        wanted = [d for d in decisions if d.outcome != "cancelled"]  # the sender did it
        if not wanted:
            return
        now = self._clock()
        async with self._store.read() as session:
            ids = list({d.message_id for d in wanted})
            found = await session.scalars(select(Message).where(Message.id.in_(ids)))
            messages = {m.id: m for m in found}
        notices = []
        for decision in wanted:
            message = messages.get(decision.message_id)
            if message is None or not message.mail_from or message.kind != "message":
                continue
            ja, en = OUTCOMES.get(decision.outcome, (decision.outcome, decision.outcome))
            detail = f"\n理由 / Reason: {decision.reason}\n" if decision.reason else "\n"
            notices.append(
                self._build(
                    [message.mail_from],
                    message,
                    now,
                    f"メールが{ja} / Your message {en}",
                    f"件名 / Subject: {message.subject or ''}\n"
                    f"判断 / Decision: {decision.outcome} ({decision.actor})" + detail,
                )
            )
        await self._store_all(notices, now)

    def _link(self, message_id: str) -> str:
        return f"{self._config.admin.public_url.rstrip('/')}/api/v1/messages/{message_id}"

    async def _load(self, message_id: str) -> Message | None:
        async with self._store.read() as session:
            return await session.get(Message, message_id)

    def _addresses(self, principals: Sequence[str]) -> list[str]:
        groups = self._credentials.group_members()
        names: set[str] = set()
        for p in principals:
            if p.startswith("group:"):
                names.update(groups.get(p.removeprefix("group:"), []))
            elif p.startswith("user:"):
                names.add(p.removeprefix("user:"))
        addresses = []
        for name in sorted(names):
            principal = self._credentials.principal(name)
            if principal and principal.emails:
                addresses.append(sorted(principal.emails)[0])
        return addresses

    def _build(
        self, to: list[str], message: Message, now: datetime, subject: str, body: str
    ) -> Notice:
        raw = build_notice(
            hostname=self._config.smtp.hostname,
            to=to,
            now=now,
            subject=subject,
            body=body + f"\nSekisho queue id: {message.id}\n",
        )
        new = NewMessage(
            id=new_id(),
            mail_from="",
            rcpt_tos=to,
            raw=raw,
            state=MessageState.QUEUED,
            verdict=Verdict.deliver().model_dump(mode="json"),
            subject=f"notice: {subject}",
            kind="notice",
        )
        return Notice(new, message.id)

    async def _store_all(self, notices: Sequence[Notice], now: datetime) -> None:
        if not notices:
            return
        async with self._store.transaction() as session:
            for notice in notices:
                await repo.add_message(session, notice.new, now)
        for notice in notices:
            self._audit.emit(
                "notice.queued",
                id=notice.new.id,
                original=notice.original,
                rcpt=notice.new.rcpt_tos,
            )
        self._wake()
