"""Transforms at delivery: ZIP-protect attachments per client, hide external
recipients (Bcc), and tell the sender the password by a separate notice.

The stored message stays the original; what leaves is built here, per claim. A copy
goes to each client company with that company's own password, so a file sent to
the wrong company cannot be opened there. Recipients without a client password get
one random password per message, kept in the store so retries and other domains'
copies use the same one the sender was told. Internal recipients get the original.

With `notify = "recipients_later"` each recipient's notice is stored delayed,
marked `awaiting-delivery:<original id>` in its `rule`, with no release time in
sight. Delivery calls `after_recorded` in the same transaction that records the
original's outcomes; once every member of the group is finished, the notice is timed
to leave `notify_delay` later if that recipient got the ZIP (or is cancelled when
not). All of it is in the store, so a restart changes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from gateway.audit import AuditLog, Event
from gateway.config import Config
from gateway.ids import new_id
from gateway.notices import password_notice
from policies.clients import domain_matches, domain_of
from policies.config import ClientSpec, ZipMethod
from policies.engine import Policy
from policies.transforms.bcc import hide_recipients
from policies.transforms.encrypt import EncryptError, encrypt_attachments
from policies.verdict import Verdict
from quarantine import repository as repo
from quarantine.db import Store
from quarantine.models import Message, MessageKey, Recipient
from quarantine.repository import Claim, NewMessage
from quarantine.states import (
    FINAL_RECIPIENT_STATES,
    MessageState,
    RecipientState,
    check_message,
    check_recipient,
)

# No look-alikes (0/O, 1/l/I): the password is read aloud or typed from a notice.
PASSWORD_ALPHABET = "23456789abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ"
PASSWORD_LENGTH = 16

Batch = tuple[Sequence[str], bytes | bytearray]  # encryption's output is a bytearray

AWAITING_DELIVERY = "awaiting-delivery:"  # + the original's id, in a notice's `rule`
AFTER_DELIVERY = "after-delivery:"  # the same notice once its time is set
# A waiting notice must never fall due on its own: delivery moves this forward.
NOT_BEFORE_DELIVERY = timedelta(days=36500)


def generate_password(length: int = PASSWORD_LENGTH) -> str:
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(length))


class HoldForReview(Exception):
    """The message cannot be protected as its rules ask: hold it, never send it as is."""


class Protector:
    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        config: Config,
        policy: Callable[[], Policy],
        clock: Callable[[], datetime],
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._audit = audit
        self._config = config
        self._policy = policy
        self._clock = clock
        self._wake = wake

    async def prepare(self, claim: Claim, raw: bytes) -> list[Batch]:
        addresses = [r.address for r in claim.recipients]
        verdict = claim.verdict
        if not verdict.get("encrypt") and not verdict.get("bcc"):
            return [(addresses, raw)]
        policy = self._policy()
        internal = tuple(policy.internal_domains)

        def is_external(address: str) -> bool:
            return not domain_matches(domain_of(address), internal)

        data = raw
        if verdict.get("bcc"):
            data = await asyncio.to_thread(hide_recipients, raw, hide=is_external)
        if not verdict.get("encrypt"):
            return [(addresses, data)]
        return await self._encrypt(claim, data, policy, is_external)

    async def _encrypt(
        self, claim: Claim, data: bytes, policy: Policy, is_external: Callable[[str], bool]
    ) -> list[Batch]:
        groups: dict[str | None, list[str]] = {}
        inside = [a for a in (r.address for r in claim.recipients) if not is_external(a)]
        for address in (r.address for r in claim.recipients):
            if is_external(address):
                client = policy.client_for(address)
                groups.setdefault(client.name if client else None, []).append(address)
        batches: list[Batch] = [(inside, data)] if inside else []
        if not groups:
            return batches
        random_password = await self._message_password(claim, policy, is_external)
        now = self._clock()
        for client_name, members in groups.items():
            client = _client(policy, client_name)
            password, method = self._password_and_method(client, random_password)
            try:
                result = await asyncio.to_thread(
                    encrypt_attachments,
                    data,
                    password=password,
                    method=method,
                    mode=self._config.encryption.mode,
                    add_header=self._config.encryption.header,
                    date_time=(now.year, now.month, now.day, now.hour, now.minute, now.second),
                )
            except EncryptError as error:
                raise HoldForReview(f"attachments could not be protected: {error}") from None
            self._audit.emit(
                "protection.applied",
                id=claim.message_id,
                client=client_name,
                rcpt=members,
                method=method.value,
                files=result.files,
                skipped=list(result.skipped),
            )
            batches.append((members, result.data))
        return batches

    def _password_and_method(
        self, client: ClientSpec | None, random_password: str
    ) -> tuple[str, ZipMethod]:
        if client is not None and client.zip_password is not None:
            return client.zip_password.get_secret_value(), client.zip_method
        method = client.zip_method if client else ZipMethod(self._config.encryption.method)
        return random_password, method

    async def _message_password(
        self, claim: Claim, policy: Policy, is_external: Callable[[str], bool]
    ) -> str:
        """The message's random password, created (with the sender's notice) once."""
        async with self._store.transaction() as session:
            existing = await session.get(MessageKey, claim.message_id, with_for_update=True)
            if existing is not None:
                return existing.password
            password = generate_password()
            now = self._clock()
            session.add(MessageKey(message_id=claim.message_id, password=password, created_at=now))
            await self._queue_notices(session, claim, policy, is_external, password, now)
        self._wake()
        return password

    async def _queue_notices(
        self,
        session: AsyncSession,
        claim: Claim,
        policy: Policy,
        is_external: Callable[[str], bool],
        password: str,
        now: datetime,
    ) -> None:
        notify = claim.verdict.get("notify") or self._config.encryption.notify
        if notify == "none" or not claim.mail_from:
            return
        message = await session.get(Message, claim.message_id)
        everyone = (
            await session.scalars(
                select(Recipient.address).where(Recipient.message_id == claim.message_id)
            )
        ).all()
        # Recipients that share a password are listed together under it.
        shared: dict[tuple[str, str], list[str]] = {}
        for address in everyone:
            if is_external(address):
                secret, method = self._password_and_method(policy.client_for(address), password)
                shared.setdefault((secret, method.value), []).append(address)
        subject = message.subject if message else None
        if notify == "recipients_later":
            # One notice per recipient: a shared notice would show recipients of other
            # companies (and Bcc'd ones) to each other.
            for (secret, method_name), members in shared.items():
                for member in members:
                    await self._add_notice(
                        session,
                        claim,
                        [member],
                        [(member, secret, method_name)],
                        subject,
                        now,
                        awaiting=claim.message_id,
                    )
            return
        lines = [(", ".join(m), secret, name) for (secret, name), m in shared.items()]
        await self._add_notice(session, claim, [claim.mail_from], lines, subject, now)

    async def _add_notice(
        self,
        session: AsyncSession,
        claim: Claim,
        to: list[str],
        lines: list[tuple[str, str, str]],
        subject: str | None,
        now: datetime,
        awaiting: str | None = None,
    ) -> None:
        raw = password_notice(
            hostname=self._config.smtp.hostname,
            to=to,
            original_id=claim.message_id,
            original_subject=subject,
            lines=lines,
            now=now,
            template=self._config.templates.get("password_notice"),
        )
        notice_id = new_id()
        await repo.add_message(
            session,
            NewMessage(
                id=notice_id,
                mail_from="",
                rcpt_tos=to,
                raw=raw,
                state=MessageState.DELAYED if awaiting else MessageState.QUEUED,
                verdict=Verdict.deliver().model_dump(mode="json"),
                subject="password notice",
                kind="notice",
                rule=AWAITING_DELIVERY + awaiting if awaiting else None,
                release_at=now + NOT_BEFORE_DELIVERY if awaiting else None,
            ),
            now,
        )
        self._audit.emit(
            "notice.queued", id=notice_id, original=claim.message_id, rcpt=to, kind="zip-password"
        )

    def after_recorded(self, session: Session, claim: Claim, now: datetime) -> list[Event]:
        """Time the notices that wait for this message's delivery (see the module
        docstring); called by delivery inside the transaction that recorded outcomes,
        which emits the returned audit events once that transaction has committed."""
        if claim.kind != "message" or not claim.verdict.get("encrypt"):
            return []
        notices = (
            session.scalars(
                select(Message)
                .where(
                    Message.state == MessageState.DELAYED,
                    Message.rule == AWAITING_DELIVERY + claim.message_id,
                )
                .with_for_update()
            )
        ).all()
        if not notices:
            return []
        rows = session.execute(
            select(Recipient.address, Recipient.state).where(
                Recipient.message_id == claim.message_id
            )
        )
        original = {address: state for address, state in rows.all()}
        events = []
        for notice in notices:
            event = self._time_notice(session, notice, original, claim.message_id, now)
            if event is not None:
                events.append(event)
        return events

    def _time_notice(
        self,
        session: Session,
        notice: Message,
        original: dict[str, RecipientState],
        original_id: str,
        now: datetime,
    ) -> Event | None:
        waiting = (
            session.scalars(
                select(Recipient).where(
                    Recipient.message_id == notice.id,
                    Recipient.state == RecipientState.WAITING,
                )
            )
        ).all()
        if any(original.get(r.address) not in FINAL_RECIPIENT_STATES for r in waiting):
            return None  # a member's copy is still on its way
        for recipient in waiting:
            if original.get(recipient.address) is not RecipientState.DELIVERED:
                # No ZIP reached them, so neither may its password.
                recipient.state = check_recipient(recipient.state, RecipientState.CANCELLED)
                recipient.updated_at = recipient.finished_at = now
        notice.rule = AFTER_DELIVERY + original_id
        notice.updated_at = now
        to = [r.address for r in waiting if r.state is RecipientState.WAITING]
        if to:
            notice.release_at = now + self._config.encryption.notify_delay
            return "notice.scheduled", {"id": notice.id, "original": original_id, "rcpt": to}
        notice.state = check_message(notice.state, MessageState.CANCELLED)
        notice.finished_at = now
        return "notice.cancelled", {"id": notice.id, "original": original_id}


def _client(policy: Policy, name: str | None) -> ClientSpec | None:
    if name is None:
        return None
    return next((c for c in policy.clients.specs if c.name == name), None)
