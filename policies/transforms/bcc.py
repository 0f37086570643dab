"""Turn chosen To/Cc recipients into Bcc by removing them from the header fields.

The envelope is not touched, so the removed addresses still receive the message; the
other recipients no longer see them. Only the To and Cc fields are rewritten, and only
when an address is removed: every other byte of the message, body included, stays as
it was. Mailboxes that stay are copied as written (display names in RFC 2047
encoded-words or raw 8-bit included). When To would be empty it becomes
`undisclosed-recipients:;` (RFC 5322 §3.6.3 allows an empty group); an empty Cc is
removed. A group (RFC 5322 §3.4) keeps its name and its remaining members; a group
whose members were all removed is removed, so that its name does not hint at them.

`hide` receives each addr-spec as written (e.g. `Taro@Example.COM`); normalising case
is the caller's choice.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parseaddr

_FIELDS = {b"to", b"cc"}
_UNDISCLOSED = "undisclosed-recipients:;"


@dataclass(frozen=True, slots=True)
class _Group:
    name: str  # "Team:" as written
    members: tuple[str, ...]


Item = str | _Group


def hide_recipients(raw: bytes, *, hide: Callable[[str], bool]) -> bytes:
    """Remove from To and Cc every mailbox whose address `hide` selects."""
    header_end = _header_end(raw)
    fields = list(_fields(raw[:header_end]))
    rewritten = [_rewrite(field, hide) for field in fields]
    if rewritten == fields:
        return raw
    had_to = any(_name(f) == b"to" for f in fields)
    if had_to and not any(_name(f) == b"to" for f in rewritten if f):
        first_to = next(i for i, f in enumerate(fields) if _name(f) == b"to")
        rewritten[first_to] = f"To: {_UNDISCLOSED}".encode() + _eol(fields[first_to])
    return b"".join(rewritten) + raw[header_end:]


def _header_end(raw: bytes) -> int:
    """Offset of the blank line ending the header section (or the end of `raw`)."""
    match = re.search(rb"\r?\n\r?\n", raw)
    if match is None:
        return len(raw)
    return match.start() + (2 if raw[match.start()] == 0x0D else 1)


def _fields(header: bytes) -> Iterator[bytes]:
    """Each header field with its folded continuation lines and line ending."""
    lines = header.splitlines(keepends=True)
    field = b""
    for line in lines:
        if line[:1] in (b" ", b"\t") and field:
            field += line
            continue
        if field:
            yield field
        field = line
    if field:
        yield field


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower()


def _eol(field: bytes) -> bytes:
    return b"\r\n" if field.endswith(b"\r\n") else b"\n"


def _rewrite(field: bytes, hide: Callable[[str], bool]) -> bytes:
    """The field without hidden mailboxes; b"" when none remain; itself when unchanged."""
    if _name(field) not in _FIELDS or b":" not in field:
        return field
    name, value = field.split(b":", 1)
    # latin-1 maps each byte to one character and back, so raw 8-bit names survive.
    items = split_addresses(value.decode("latin-1"))
    kept = [kept for item in items if (kept := _filter(item, hide)) is not None]
    if kept == items:
        return field
    if not kept:
        return b""
    eol = _eol(field)
    body = ("," + eol.decode() + " ").join(_render(item) for item in kept)
    return name + b": " + body.encode("latin-1") + eol


def _filter(item: Item, hide: Callable[[str], bool]) -> Item | None:
    if isinstance(item, str):
        return None if _hidden(item, hide) else item
    members = tuple(m for m in item.members if not _hidden(m, hide))
    if item.members and not members:
        return None
    return item if members == item.members else _Group(item.name, members)


def _hidden(mailbox: str, hide: Callable[[str], bool]) -> bool:
    _, address = parseaddr(re.sub(r"\r?\n", "", mailbox))
    return bool(address) and hide(address)


def _render(item: Item) -> str:
    if isinstance(item, str):
        return item
    return item.name + " " + ", ".join(item.members) + ";" if item.members else item.name + ";"


def split_addresses(value: str) -> list[Item]:
    """Split an address-list (RFC 5322 §3.4) at its top-level commas, keeping each
    mailbox's text as written; `name: a, b;` becomes one group.

    Quoted strings, comments and angle brackets are skipped over, so a comma inside
    `"Yamada, Taro" <t@example.jp>` does not split it.
    """
    items: list[Item] = []
    group: tuple[str, list[str]] | None = None
    for token, end in _top_level(value):
        text = token.strip()
        if end == ":" and group is None:
            group = (text + ":", [])
            continue
        if text and group is not None:
            group[1].append(text)
        elif text:
            items.append(text)
        if end == ";" and group is not None:
            items.append(_Group(group[0], tuple(group[1])))
            group = None
    if group is not None:  # unterminated group: keep what it had
        items.append(_Group(group[0], tuple(group[1])))
    return items


def _top_level(value: str) -> Iterator[tuple[str, str]]:
    """(text, delimiter) pieces split at top-level `,` `:` `;`; delimiter "" at the end."""
    start, depth, quoted, angle, i = 0, 0, False, False, 0
    while i < len(value):
        char = value[i]
        if char == "\\" and (quoted or depth):
            i += 2  # quoted-pair (RFC 5322 §3.2.1)
            continue
        if quoted:
            quoted = char != '"'
        elif char == '"' and not depth:
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth and char in "<>":
            angle = char == "<"
        elif not depth and not angle and char in ",:;":
            yield value[start:i], char
            start = i + 1
        i += 1
    yield value[start:], ""
