"""Where each MIME part lies in the raw bytes, and a small skeleton to decide on.

The encryption transform decides what an attachment is with the email package, the
same way the facts do, but parsing a 10 MB message through it costs far more than
zipping the file. So:

1. `scan` finds every part's byte range the way `email.feedparser` does (the same
   header-block rule, the same boundary pattern, outer boundaries recognised at any
   depth, RFC 2046 §5.1.1: the line break before a delimiter belongs to the
   delimiter). It reads header blocks and lines that start with "--" only; a leaf
   body is skipped with one `bytes.find`.
2. `skeleton` removes the inside of long base64 bodies. A run of lines made only of
   base64 characters can change nothing the feed parser decides: such a line is
   never a header, a blank separator or a boundary (no ':', no leading blank, no
   '-'), so the first of them ends a header block exactly as the whole run does. The
   skeleton therefore parses to the same tree, headers and filenames as the message,
   whatever `scan` got wrong.
3. `match` walks the parsed skeleton beside the scanned ranges and demands the same
   shape, the same header fields and the same leaf payloads. Only then are the ranges
   trusted for splicing; anything else raises `Unsupported`, and the caller falls back
   to the full parse.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from typing import Literal

from policies.mime import SMTP_POLICY

_HEADER = re.compile(rb"From |[\x21-\x39\x3b-\x7e]*:|[\t ]")  # feedparser.headerRE
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_COLLAPSE_MIN = 4096  # shorter bodies are cheap to parse as they are
_WINDOW = 1 << 20  # bytes of a body checked at a time
_MAX_DEPTH = 64  # deeper than the walk allows (policies.mime.MAX_DEPTH): the full parse decides

Kind = Literal["leaf", "multipart", "message"]


class Unsupported(Exception):
    """The ranges cannot be vouched for; use the full parse."""


@dataclass(eq=False, slots=True)
class Node:
    start: int  # first byte of the first header line
    header_end: int  # end of the last header line
    body: int  # first byte of the body
    end: int = 0  # end of the content, before the delimiter's line break
    stop: int = 0  # start of the line that ended the part (next delimiter), or EOF
    delimiter: int = 0  # start of the delimiter line(s) that opened this part
    kind: Kind = "leaf"
    fields: list[tuple[int, int]] = field(default_factory=list)  # each header field
    items: list[tuple[str, str]] = field(default_factory=list)  # as the parser stores them
    headers: EmailMessage = field(default_factory=lambda: EmailMessage(policy=SMTP_POLICY))
    children: list[Node] = field(default_factory=list)
    parent: Node | None = None


def scan(data: bytes) -> Node:
    scanner = _Scanner(data)
    root = scanner.part(0, None, 0)
    root.stop = len(data)
    _set_end(root, len(data))
    return root


def _set_end(node: Node, end: int) -> None:
    """The parser trims the line break before a delimiter from the innermost payload."""
    node.end = end
    while node.kind == "message":
        node = node.children[0]
        node.end = end


class _Scanner:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._eof: list[re.Pattern[bytes]] = []  # innermost last, like feedparser's stack

    def _line_end(self, pos: int) -> int:
        found = self._data.find(b"\n", pos)
        return len(self._data) if found < 0 else found + 1

    def _at_eof(self, pos: int) -> bool:
        if pos >= len(self._data):
            return True
        if not self._data.startswith(b"--", pos):
            return False
        end = self._line_end(pos)
        return any(p.match(self._data, pos, end) for p in reversed(self._eof))

    def _next_dash_line(self, pos: int) -> int:
        if self._data.startswith(b"--", pos):
            return pos
        # A one-byte search runs at memchr speed and base64 has no '-': a body is
        # crossed in one step, then the line is searched for from the first dash.
        dash = self._data.find(b"-", pos)
        found = -1 if dash < 0 else self._data.find(b"\n--", dash - 1)
        return len(self._data) if found < 0 else found + 1

    def _skip_to_eof(self, pos: int) -> int:
        while True:
            pos = self._next_dash_line(pos)
            if self._at_eof(pos):
                return pos
            pos = self._line_end(pos)

    def part(self, pos: int, parent: Node | None, depth: int) -> Node:
        if depth > _MAX_DEPTH:
            raise Unsupported("nested too deep")
        node = self._headers(pos, parent)
        content_type = node.headers.get_content_type()
        if content_type == "message/delivery-status":
            raise Unsupported("delivery-status blocks")
        if node.headers.get_content_maintype() == "message":
            node.kind = "message"
            inner = self.part(node.body, node, depth + 1)
            node.children.append(inner)
            node.stop = inner.stop
        elif (
            node.headers.get_content_maintype() == "multipart"
            and node.headers.get_boundary() is not None
        ):
            self._multipart(node, depth)
        else:
            node.stop = self._skip_to_eof(node.body)
        return node

    def _headers(self, pos: int, parent: Node | None) -> Node:
        data, start, lines = self._data, pos, []
        body = -1
        while not self._at_eof(pos):
            end = self._line_end(pos)
            if not _HEADER.match(data, pos, end):
                body = end if data[pos : pos + 1] in (b"\r", b"\n") else pos
                break
            lines.append((pos, end))
            pos = end
        node = Node(start, pos, pos if body < 0 else body, parent=parent)
        if parent is not None and parent.headers.get_content_type() == "multipart/digest":
            node.headers.set_default_type("message/rfc822")
        self._fields(node, lines)
        return node

    def _fields(self, node: Node, lines: list[tuple[int, int]]) -> None:
        data = self._data
        for line_start, line_end in lines:
            first = data[line_start : line_start + 1]
            if first in (b" ", b"\t") and node.fields:
                node.fields[-1] = (node.fields[-1][0], line_end)
            elif first in (b" ", b"\t", b":") or data.startswith(b"From ", line_start):
                raise Unsupported("a header line the parser sets aside")
            else:
                node.fields.append((line_start, line_end))
        for field_start, field_end in node.fields:
            text = data[field_start:field_end].decode("ascii", "surrogateescape")
            name, value = SMTP_POLICY.header_source_parse(text.splitlines(keepends=True))
            node.items.append((name, value))
            node.headers.set_raw(name, value)

    def _multipart(self, node: Node, depth: int) -> None:
        boundary = node.headers.get_boundary()
        assert boundary is not None
        try:
            separator = b"--" + boundary.encode("ascii", "surrogateescape")
        except UnicodeEncodeError:
            raise Unsupported("non-ASCII boundary") from None
        pattern = re.compile(re.escape(separator) + rb"(--)?[ \t]*(\r\n|\r|\n)?$")
        pos = node.body
        while True:
            pos = self._next_dash_line(pos)
            if self._at_eof(pos):
                break
            end = self._line_end(pos)
            found = pattern.match(self._data, pos, end)
            if found is None:
                pos = end
                continue
            if found.group(1):  # the close delimiter; the rest is epilogue
                node.kind = "multipart"
                pos = self._skip_to_eof(end)
                break
            node.kind = "multipart"
            pos = self._child(node, pattern, pos, depth)
        if node.kind != "multipart":
            raise Unsupported("multipart without a start boundary")
        node.stop = pos

    def _child(self, node: Node, pattern: re.Pattern[bytes], pos: int, depth: int) -> int:
        delimiter = pos
        while pos < len(self._data) and pattern.match(self._data, pos, self._line_end(pos)):
            if self._at_eof(pos):
                raise Unsupported("a delimiter that is also an outer boundary")
            pos = self._line_end(pos)  # repeated delimiters make no empty parts
        self._eof.append(pattern)
        try:
            child = self.part(pos, node, depth + 1)
        finally:
            self._eof.pop()
        child.delimiter = delimiter
        _set_end(child, _before_line_break(self._data, child.start, child.stop))
        node.children.append(child)
        return child.stop


def _before_line_break(data: bytes, start: int, stop: int) -> int:
    if stop <= start:
        return stop
    if data.startswith(b"\r\n", stop - 2) and stop - 2 >= start:
        return stop - 2
    return stop - 1 if data[stop - 1 : stop] in (b"\n", b"\r") else stop


def transfer_encoding(node: Node) -> str:
    value = node.headers.get("content-transfer-encoding")
    return "" if value is None else str(value).strip().lower()


@dataclass(frozen=True, slots=True)
class Skeleton:
    data: bytes
    cuts: list[int]  # raw offsets where bytes were removed, ascending
    removed: list[int]  # running total removed up to and including each cut

    def at(self, raw_offset: int) -> int:
        index = bisect.bisect_left(self.cuts, raw_offset)
        return raw_offset - (self.removed[index - 1] if index else 0)


def skeleton(data: bytes, root: Node) -> Skeleton:
    """`data` without the inner lines of long base64 bodies (see the module docstring)."""
    spans = [span for leaf in _leaves(root) if (span := _collapsible(data, leaf))]
    pieces: list[bytes] = []
    cuts: list[int] = []
    removed: list[int] = []
    cursor = total = 0
    for start, end in spans:
        pieces.append(data[cursor:start])
        total += end - start
        cuts.append(start)
        removed.append(total)
        cursor = end
    if not spans:
        return Skeleton(data, [], [])
    pieces.append(data[cursor:])
    return Skeleton(b"".join(pieces), cuts, removed)


def _leaves(node: Node) -> list[Node]:
    if node.kind == "leaf":
        return [node]
    return [leaf for child in node.children for leaf in _leaves(child)]


def _collapsible(data: bytes, leaf: Node) -> tuple[int, int] | None:
    """Whole lines between the body's first and last line, if all are base64 lines."""
    if leaf.end - leaf.body < _COLLAPSE_MIN or transfer_encoding(leaf) != "base64":
        return None
    start = data.find(b"\n", leaf.body, leaf.end) + 1
    end = data.rfind(b"\n", start, leaf.end) + 1
    if start <= 0 or end <= start:
        return None
    # The kept first line must be a base64 line too: after it the parser is in a body,
    # where such lines change nothing.
    rest = _not_base64(data, leaf.body, end)
    if rest is None:
        return None
    crlf = rest[:2] == b"\r\n"
    if rest != (b"\r\n" * (len(rest) // 2) if crlf else b"\n" * len(rest)):
        return None  # other characters, or mixed or bare line breaks
    if _even_lines(data, leaf.body, end, b"\r\n" if crlf else b"\n", len(rest)):
        return start, end
    blank = b"\n\r\n" if crlf else b"\n\n"
    if data[leaf.body : leaf.body + 1] in (b"\r", b"\n") or data.find(blank, leaf.body, end) >= 0:
        return None  # a blank line separates; keep it
    return start, end


def _not_base64(data: bytes, start: int, end: int) -> bytes | None:
    """The bytes of data[start:end] that are not base64 characters, if all are CR or LF.

    Read in windows: a 50 MB body is never copied whole (`data[a:b]` copies)."""
    found: list[bytes] = []
    for at in range(start, end, _WINDOW):
        rest = data[at : min(end, at + _WINDOW)].translate(None, _BASE64)
        if rest.translate(None, b"\r\n"):
            return None
        found.append(rest)
    return b"".join(found)


def _even_lines(data: bytes, start: int, end: int, nl: bytes, breaks: int) -> bool:
    """True when the lines in data[start:end], base64 characters and line breaks only,
    are all of one width but the last, which is not blank: the line breaks, counted by
    the caller, all sit at the width's positions, so no line is blank. Cheaper than
    searching for a blank line."""
    last = data.rfind(b"\n", start, end - 1) + 1
    if last <= start or end - last <= len(nl) or not data.endswith(nl, start, end):
        return False
    end, breaks = last, breaks - len(nl)
    width = data.find(b"\n", start, end) + 1 - start
    lines, extra = divmod(end - start, width) if width > len(nl) else (0, 1)
    if extra or lines * len(nl) != breaks:
        return False
    return all(
        data[start + width - len(nl) + i : end : width] == nl[i : i + 1] * lines
        for i in range(len(nl))
    )


def match(root: Node, message: Message, skel: Skeleton) -> dict[int, Node]:
    """Map each parsed part (by id) to its scanned node, or raise `Unsupported`."""
    found: dict[int, Node] = {}
    _match(root, message, skel, found)
    return found


def _match(node: Node, part: Message, skel: Skeleton, found: dict[int, Node]) -> None:
    if list(part.raw_items()) != node.items:
        raise Unsupported("header fields differ")
    # The payload as parsed: get_payload() would decode 8-bit text through its charset.
    payload = getattr(part, "_payload", None)
    if node.kind == "leaf":
        if not isinstance(payload, str):
            raise Unsupported("shape differs")
        expected = skel.data[skel.at(node.body) : skel.at(node.end)]
        if payload != expected.decode("ascii", "surrogateescape"):
            raise Unsupported("payload differs")
    else:
        if not isinstance(payload, list) or len(payload) != len(node.children):
            raise Unsupported("shape differs")
        for child, sub in zip(node.children, payload, strict=True):
            if not isinstance(sub, Message):
                raise Unsupported("shape differs")
            _match(child, sub, skel, found)
    found[id(part)] = node
