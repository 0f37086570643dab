"""Message ids: short, URL-safe, unique across instances, and sortable by time."""

from __future__ import annotations

import secrets
import time

# Crockford's base32 without look-alikes, lower case: safe in URLs, logs and SMTP replies.
_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"


def new_id(now_ms: int | None = None) -> str:
    """48 bits of milliseconds then 62 random bits: 22 characters, ordered by time.

    The random part makes collisions between instances negligible (2^-31 for two
    instances minting a billion ids in the same millisecond), with no coordination.
    """
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 62) | secrets.randbits(62)
    chars = []
    for _ in range(22):
        value, digit = divmod(value, 32)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


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
