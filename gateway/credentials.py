"""SMTP credentials: an in-memory cache of users, with argon2 checks off the event loop.

aiosmtpd's authenticator callback is synchronous, so a password hash or a database
read inside it would stall every connection (FIELD-NOTES). The SMTP handler instead
implements AUTH itself and awaits `Credentials.check`, which reads users from memory
(refreshed from the store every few seconds, so a change made through another
instance takes effect quickly) and runs argon2 in a thread.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from quarantine import accounts
from quarantine.db import Store

_hasher = PasswordHasher()
# Verified logins are remembered for a while so that a mail client reconnecting every
# minute does not cost an argon2 hash each time. The key is an HMAC with a per-process
# secret, so the cache holds nothing that reveals the password.
_REMEMBER_SECONDS = 300.0


def hash_password(password: str) -> str:
    return _hasher.hash(password)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is sending: a user's name, role, addresses and groups."""

    name: str
    role: str
    emails: frozenset[str]
    groups: tuple[str, ...]

    def may_send_as(self, address: str) -> bool:
        return address.lower() in self.emails


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal
    password_hash: str | None
    disabled: bool


class Credentials:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._users: dict[str, _Entry] = {}
        self._key = secrets.token_bytes(32)
        self._remembered: dict[bytes, tuple[float, str]] = {}

    async def refresh(self) -> None:
        async with self._store.read() as session:
            rows = await accounts.all_users(session)
        self._users = {
            u.name: _Entry(
                Principal(u.name, u.role, frozenset(e.lower() for e in u.emails), tuple(u.groups)),
                u.password_hash,
                u.disabled,
            )
            for u in rows
        }

    def principal(self, name: str) -> Principal | None:
        entry = self._users.get(name)
        return entry.principal if entry and not entry.disabled else None

    def group_members(self) -> dict[str, list[str]]:
        members: dict[str, list[str]] = {}
        for entry in self._users.values():
            for group in entry.principal.groups:
                members.setdefault(group, []).append(entry.principal.name)
        return members

    async def check(self, login: str, password: str) -> Principal | None:
        entry = self._users.get(login)
        if entry is None or entry.disabled or not entry.password_hash:
            # Spend the same time as a real check, so a probe cannot tell which names exist.
            await asyncio.to_thread(lambda: _verify(dummy_hash(), password))
            return None
        key = hmac.new(self._key, f"{login}\0{password}".encode(), hashlib.sha256).digest()
        remembered = self._remembered.get(key)
        if remembered and remembered[0] > time.monotonic() and remembered[1] == entry.password_hash:
            return entry.principal
        if not await asyncio.to_thread(_verify, entry.password_hash, password):
            return None
        self._remembered[key] = (time.monotonic() + _REMEMBER_SECONDS, entry.password_hash)
        if len(self._remembered) > 10_000:
            self._remembered.clear()
        return entry.principal

    def names(self) -> Sequence[str]:
        return sorted(self._users)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@functools.cache
def dummy_hash() -> str:
    """A hash to verify against for unknown users, made on first use (off the loop,
    inside the worker thread) rather than at import, which would cost start-up ~0.5 s."""
    return _hasher.hash("not a real password")
