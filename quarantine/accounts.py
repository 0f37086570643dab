"""Users (senders, approvers, admins, auditors) and their API tokens."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from quarantine.models import Token, User


class Role(StrEnum):
    SENDER = "sender"
    APPROVER = "approver"
    ADMIN = "admin"
    AUDITOR = "auditor"


class AccountError(Exception):
    """A user or token operation that cannot be done; the message says why."""


async def get_user(session: AsyncSession, name: str) -> User | None:
    user: User | None = await session.scalar(select(User).where(User.name == name))
    return user


async def all_users(session: AsyncSession) -> Sequence[User]:
    return (await session.scalars(select(User).order_by(User.name))).all()


async def add_user(
    session: AsyncSession,
    *,
    name: str,
    password_hash: str | None,
    role: Role,
    emails: Sequence[str],
    groups: Sequence[str],
    now: datetime,
) -> User:
    if await get_user(session, name) is not None:
        raise AccountError(f"user {name!r} already exists")
    taken = await _owners_of(session, emails)
    if taken:
        raise AccountError("address already belongs to another user: " + ", ".join(taken))
    user = User(
        name=name,
        password_hash=password_hash,
        role=role.value,
        emails=[e.lower() for e in emails],
        groups=list(groups),
        created_at=now,
        updated_at=now,
        disabled=False,
    )
    session.add(user)
    await session.flush()
    return user


async def _owners_of(session: AsyncSession, emails: Sequence[str]) -> list[str]:
    wanted = {e.lower() for e in emails}
    clashes = []
    for user in await all_users(session):
        clashes += [f"{e} ({user.name})" for e in user.emails if e in wanted]
    return clashes


async def remove_user(session: AsyncSession, name: str) -> None:
    user = await get_user(session, name)
    if user is None:
        raise AccountError(f"no user {name!r}")
    await session.execute(delete(Token).where(Token.user_id == user.id))
    await session.delete(user)


async def set_password(session: AsyncSession, name: str, password_hash: str, now: datetime) -> None:
    user = await get_user(session, name)
    if user is None:
        raise AccountError(f"no user {name!r}")
    user.password_hash = password_hash
    user.updated_at = now


async def add_token(
    session: AsyncSession,
    *,
    user: str,
    token_hash: str,
    prefix: str,
    label: str | None,
    expires_at: datetime | None,
    now: datetime,
) -> Token:
    owner = await get_user(session, user)
    if owner is None:
        raise AccountError(f"no user {user!r}")
    token = Token(
        user_id=owner.id,
        token_hash=token_hash,
        prefix=prefix,
        label=label,
        created_at=now,
        expires_at=expires_at,
    )
    session.add(token)
    await session.flush()
    return token


async def tokens_of(session: AsyncSession, user: str | None = None) -> Sequence[tuple[Token, str]]:
    query = select(Token, User.name).join(User, User.id == Token.user_id).order_by(Token.id)
    if user is not None:
        query = query.where(User.name == user)
    return [(t, n) for t, n in (await session.execute(query)).all()]


async def revoke_token(session: AsyncSession, prefix: str, now: datetime) -> int:
    tokens = (
        await session.scalars(
            select(Token).where(Token.prefix == prefix, Token.revoked_at.is_(None))
        )
    ).all()
    if not tokens:
        raise AccountError(f"no active token {prefix!r}")
    for token in tokens:
        token.revoked_at = now
    return len(tokens)
