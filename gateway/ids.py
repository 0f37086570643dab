"""Message ids: short, URL-safe, unique across instances, and sortable by time."""

from __future__ import annotations

import os
import struct
import time

# Crockford's base32 without look-alikes, lower case: safe in URLs, logs and SMTP replies.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
_ID_BITS = 110  # 22 digits of 5 bits
# Two digits per 10 bits: 11 look-ups instead of 22 divisions.
_PAIRS = tuple(a + b for a in _ALPHABET for b in _ALPHABET)
_SHIFTS = tuple(range(_ID_BITS - 10, -1, -10))
_POOL_SIZE = 512  # random numbers read from os.urandom at once

# Random 64-bit numbers, read 4 KB at a time: one getrandom call per 512 ids instead of
# one per id. A list's pop and extend are atomic, so threads never share a number, and
# a forked child empties it, so that parent and child never both hand out a number.
_pool: list[int] = []
os.register_at_fork(after_in_child=_pool.clear)


def _random62() -> int:
    while True:
        try:
            return _pool.pop() >> 2
        except IndexError:
            _pool.extend(struct.unpack(f">{_POOL_SIZE}Q", os.urandom(8 * _POOL_SIZE)))


def new_id(now_ms: int | None = None) -> str:
    """48 bits of milliseconds then 62 random bits: 22 characters, ordered by time.

    The random part makes collisions between instances negligible (2^-31 for two
    instances minting a billion ids in the same millisecond), with no coordination.
    """
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 62) | _random62()
    return "".join([_PAIRS[(value >> shift) & 1023] for shift in _SHIFTS])


def is_valid_id(text: str) -> bool:
    return len(text) == 22 and all(c in _ALPHABET for c in text)


def created_ms(message_id: str) -> int | None:
    """The millisecond timestamp a message id was minted at, or None for a foreign id."""
    if not is_valid_id(message_id):
        return None
    value = 0
    for char in message_id:
        value = value * 32 + _ALPHABET.index(char)
    return value >> 62
