"""Mail about held messages: to the approvers when mail is held (with a link), and to
the sender when it is held, approved, released, rejected or expired.

Notices are ordinary messages queued in the store from the null sender, so they are
durable, retried and audited like any other mail, and never bounce.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from sqlalchemy.ext.asyncio import AsyncSession

from gateway.approvals import Decision, deciders
from gateway.audit import AuditLog
from gateway.config import Config
from gateway.credentials import Credentials
from gateway.ids import new_id
from policies.mime import SMTP_POLICY
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


class WorkflowNotices:
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
        self._pending: set[asyncio.Task[None]] = set()

    async def held(self, message_id: str) -> None:
        """Tell the deciders (by mail) and the sender that a message waits for a decision."""
        try:
            await self._held(message_id)
        except Exception:
            log.exception("could not queue the held notices for %s", message_id)

    async def _held(self, message_id: str) -> None:
        now = self._clock()
        async with self._store.transaction() as session:
            message = await session.get(Message, message_id)
            if message is None or message.state is not MessageState.HELD:
                return
            who = deciders(message, self._config.approval, now)
            link = f"{self._config.admin.public_url.rstrip('/')}/api/v1/messages/{message_id}"
            reason = str(message.verdict.get("reason") or message.rule or "")
            approvers = self._addresses(who)
            if approvers:
                await self._queue(
                    session,
                    approvers,
                    message,
                    now,
                    "承認待ちのメール / Mail waiting for your approval",
                    f"送信者 / From: {message.mail_from}\n"
                    f"件名 / Subject: {message.subject or ''}\n"
                    f"理由 / Held by: {message.rule}: {reason}\n\n"
                    f"確認と承認 / Review and approve:\n{link}\n",
                )
            if message.mail_from and message.kind == "message":
                await self._queue(
                    session,
                    [message.mail_from],
                    message,
                    now,
                    "メールを保留しました / Your message is held",
                    f"件名 / Subject: {message.subject or ''}\n"
                    f"理由 / Why: {message.rule}: {reason}\n"
                    f"承認者 / Decided by: {', '.join(who) or '-'}\n",
                )
        self._wake()

    async def decided(self, decision: Decision) -> None:
        """The `on_decision` hook: tell the sender what became of their message.

        Queued in the background: the approver's answer does not wait for the notice.
        """
        task = asyncio.get_running_loop().create_task(self._decided(decision))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _decided(self, decision: Decision) -> None:
        try:
            await self._queue_decision(decision)
        except Exception:
            log.exception("could not queue the decision notice for %s", decision.message_id)

    async def _queue_decision(self, decision: Decision) -> None:
        if decision.outcome == "cancelled":
            return  # the sender did it themselves
        ja, en = OUTCOMES.get(decision.outcome, (decision.outcome, decision.outcome))
        now = self._clock()
        async with self._store.transaction() as session:
            message = await session.get(Message, decision.message_id)
            if message is None or not message.mail_from or message.kind != "message":
                return
            detail = f"\n理由 / Reason: {decision.reason}\n" if decision.reason else "\n"
            await self._queue(
                session,
                [message.mail_from],
                message,
                now,
                f"メールが{ja} / Your message {en}",
                f"件名 / Subject: {message.subject or ''}\n"
                f"判断 / Decision: {decision.outcome} ({decision.actor})" + detail,
            )
        self._wake()

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

    async def _queue(
        self,
        session: AsyncSession,
        to: list[str],
        message: Message,
        now: datetime,
        subject: str,
        body: str,
    ) -> None:
        notice = EmailMessage(policy=SMTP_POLICY)
        host = self._config.smtp.hostname
        notice["From"] = f"Sekisho <postmaster@{host}>"
        notice["To"] = ", ".join(to)
        notice["Subject"] = f"[Sekisho] {subject}"
        notice["Date"] = format_datetime(now)
        notice["Message-ID"] = make_msgid(domain=host)
        notice["Auto-Submitted"] = "auto-generated"  # RFC 3834
        notice.set_content(body + f"\nSekisho queue id: {message.id}\n", cte="base64")
        notice_id = new_id()
        await repo.add_message(
            session,
            NewMessage(
                id=notice_id,
                mail_from="",
                rcpt_tos=to,
                raw=notice.as_bytes(policy=SMTP_POLICY),
                state=MessageState.QUEUED,
                verdict=Verdict.deliver().model_dump(mode="json"),
                subject=f"notice: {subject}",
                kind="notice",
            ),
            now,
        )
        self._audit.emit("notice.queued", id=notice_id, original=message.id, rcpt=to)
