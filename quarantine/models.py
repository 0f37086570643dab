"""SQLAlchemy models. Bodies live apart from metadata so listing never loads them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from quarantine.states import MessageState, RecipientState

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite has no time zones), always returned aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; pass an aware UTC time")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


Id = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
        list[Any]: JSON(),
    }


def _enum(enum: type[MessageState] | type[RecipientState], name: str) -> Enum:
    return Enum(
        enum,
        name=name,
        native_enum=False,
        length=16,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


DECIDED_ACTIONS = ("hold", "delay")  # the verdicts that name approvers


def approvers_key(verdict: dict[str, Any] | None) -> str | None:
    """The `approvers` column: the JSON list of approvers a hold or delay verdict
    names (`[]` for none: the default approvers decide), None for other verdicts."""
    if not verdict or verdict.get("action") not in DECIDED_ACTIONS:
        return None
    return json.dumps([str(a) for a in verdict.get("approvers") or ()])


def sender_address_key(mail_from: str | None) -> str | None:
    """The `sender_address` column: the envelope sender, lowercased, as listings match it."""
    return None if mail_from is None else str(mail_from).lower()


def _row(context: DefaultExecutionContext) -> dict[str, Any]:
    """The values of the row being inserted (one row of an executemany too)."""
    row: dict[str, Any] = context.get_current_parameters()  # type: ignore[no-untyped-call]
    return row


def _approvers_default(context: DefaultExecutionContext) -> str | None:
    return approvers_key(_row(context).get("verdict"))


def _sender_address_default(context: DefaultExecutionContext) -> str | None:
    return sender_address_key(_row(context).get("mail_from"))


class Message(Base):
    __tablename__ = "messages"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    state: Mapped[MessageState] = mapped_column(_enum(MessageState, "message_state"))
    kind: Mapped[str] = mapped_column(String(16), default="message")  # message | dsn | notice
    mail_from: Mapped[str] = mapped_column(Text)
    sender_user: Mapped[str | None] = mapped_column(String(128))
    client_address: Mapped[str | None] = mapped_column(String(64))
    helo: Mapped[str | None] = mapped_column(Text)
    subject: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    rule: Mapped[str | None] = mapped_column(String(128))  # the rule that decided the verdict
    verdict: Mapped[dict[str, Any]]
    attachments: Mapped[list[Any]]
    release_at: Mapped[datetime | None]  # end of a delay window, or a hold's expiry
    finished_at: Mapped[datetime | None]
    # Derived on insert, for the listing's indexes: who may see a message is matched by
    # index, not by LIKE over every held verdict (see quarantine.approvals).
    approvers: Mapped[str | None] = mapped_column(Text, default=_approvers_default)
    sender_address: Mapped[str | None] = mapped_column(Text, default=_sender_address_default)

    recipients: Mapped[list[Recipient]] = relationship(
        back_populates="message", order_by="Recipient.id", lazy="raise"
    )

    __table_args__ = (
        Index(None, "state", "created_at"),
        # Lists page by id within a state (ids sort by time): without this index
        # SQLite sorts every held message to find one page.
        Index(None, "state", "id"),
        # A scoped listing reads one page per branch of the scope, in id order within
        # a state: its own mail (by login or address), each approver list naming them.
        Index(None, "sender_user", "state", "id"),
        Index(None, "sender_address", "state", "id"),
        Index(None, "approvers", "state", "id"),
        # Held mail of one rule, a page at a time, however rare the rule.
        Index(None, "rule", "state", "id"),
    )


class Body(Base):
    """The original message bytes, exactly as accepted (after CRLF normalisation)."""

    __tablename__ = "bodies"

    message_id: Mapped[str] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)  # None once purged by retention


class Recipient(Base):
    __tablename__ = "recipients"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(Text)
    domain: Mapped[str] = mapped_column(String(255))
    state: Mapped[RecipientState] = mapped_column(_enum(RecipientState, "recipient_state"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    queued_at: Mapped[datetime | None]  # released to delivery; bounce_after counts from here
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None]
    last_code: Mapped[int | None] = mapped_column(Integer)
    last_response: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]

    message: Mapped[Message] = relationship(back_populates="recipients", lazy="raise")

    __table_args__ = (
        Index(None, "state", "next_attempt_at"),
        # A message's recipients in one state (finishing a message, its waiting
        # copies): without `state` here SQLite, which keeps no statistics, reads the
        # (state, next_attempt_at) index instead and walks every delivered
        # recipient ever stored, so each finished message costs more than the last.
        Index(None, "message_id", "state"),
    )


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    password_hash: Mapped[str | None] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    groups: Mapped[list[Any]]
    emails: Mapped[list[Any]]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    disabled: Mapped[bool] = mapped_column(default=False)


class Token(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256 of a random token
    prefix: Mapped[str] = mapped_column(String(16))  # shown in listings to tell tokens apart
    label: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class MessageKey(Base):
    """The per-message ZIP password for recipients without a client password.

    Kept so that a retry, or a later copy for another domain, uses the same password
    the sender was told. Never part of the verdict, the trace, the API or the audit
    log; removed with the message.
    """

    __tablename__ = "message_keys"

    message_id: Mapped[str] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    password: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class Approval(Base):
    """One person's decision on one held message. Unique per (message, user): approving
    twice is one approval, so `min_approvals` counts distinct people."""

    __tablename__ = "approvals"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    user: Mapped[str] = mapped_column(String(128))
    decision: Mapped[str] = mapped_column(String(16))  # approve | reject
    comment: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("message_id", "user"),)


class Reminder(Base):
    """When the deciders of a held message were last reminded, and when its
    `escalate_to` groups were told. Kept in the store so that reminders follow the
    store's clock: a restart, or several instances, send each one once."""

    __tablename__ = "reminders"

    message_id: Mapped[str] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True
    )
    reminded_at: Mapped[datetime | None]
    escalated_at: Mapped[datetime | None]


class KnownDomain(Base):
    """A recipient domain mail has been delivered to (`first_time_recipient_domain`).

    Kept apart from recipients so that reading the set costs one row per domain, not
    one per recipient ever delivered, and outlives retention's purge of old mail.
    """

    __tablename__ = "known_domains"

    domain: Mapped[str] = mapped_column(String(255), primary_key=True)
    first_delivered_at: Mapped[datetime]
