"""A parsed message whose long base64 bodies stay in the raw bytes.

The email package keeps a body as one str per line while it parses, then joins them:
a 50 MB attachment costs over 300 MB of Python memory (the input decoded to a str and
held in a StringIO, the lines, the joined payload). For inspection, only the headers
and the structure need the email package; a body is needed once, decoded.

So a large message is parsed as the encryption transform parses it (`_ranges`): the
email package parses a skeleton without the inner lines of long base64 bodies, the
scanned ranges are checked part by part against that parse, and each shortened body
is decoded straight from the raw bytes. The tree, the headers and the filenames are
the email package's own; where the ranges cannot be vouched for, the whole message is
parsed as before.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from email.message import EmailMessage, Message

from policies.mime import INSPECTION_POLICY, decoded_payload, parse
from policies.transforms import _ranges

# Below this, the whole parse costs less than a few MB: not worth the scan.
LEAN_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class _Body:
    """A body the parsed message holds shortened, and where it lies in the raw bytes."""

    start: int
    end: int
    rendered: int  # what the removed lines add to `as_bytes()` (CRLF line ends)


@dataclass(frozen=True, slots=True)
class Parsed:
    message: EmailMessage
    raw: bytes = b""
    shortened: dict[int, _Body] = field(default_factory=dict)  # by id() of the part

    def payload(self, part: Message) -> bytes:
        """The part's body, its transfer encoding undone (`mime.decoded_payload`)."""
        body = self.shortened.get(id(part))
        if body is None:
            return decoded_payload(part)
        try:
            return binascii.a2b_base64(memoryview(self.raw)[body.start : body.end])
        except binascii.Error:
            # Broken base64 that the email package repairs: give it the whole body.
            del self.shortened[id(part)]
            part.set_payload(self.raw[body.start : body.end].decode("ascii", "surrogateescape"))
            return decoded_payload(part)

    def serialized_size(self, part: Message) -> int:
        """len(part.as_bytes()) as if the part held its whole bodies."""
        bodies = (self.shortened.get(id(p)) for p in part.walk())
        return len(part.as_bytes()) + sum(body.rendered for body in bodies if body is not None)


def parse_message(raw: bytes) -> Parsed:
    """Parse `raw`, keeping long base64 bodies out of the email package when it is large."""
    if len(raw) >= LEAN_BYTES:
        try:
            lean = _lean(raw)
        except Exception:  # anything unexpected: the whole parse decides
            lean = None
        if lean is not None:
            return lean
    return Parsed(parse(raw, INSPECTION_POLICY))


def _lean(raw: bytes) -> Parsed | None:
    root = _ranges.scan(raw)
    skeleton = _ranges.skeleton(raw, root)
    if not skeleton.cuts:
        return None
    message = parse(skeleton.data, INSPECTION_POLICY)
    nodes = _ranges.match(root, message, skeleton)  # raises Unsupported where they differ
    shortened: dict[int, _Body] = {}
    for part_id, node in nodes.items():
        if node.kind != "leaf":
            continue
        removed = (node.end - skeleton.at(node.end)) - (node.body - skeleton.at(node.body))
        if removed:
            shortened[part_id] = _Body(node.body, node.end, _rendered(raw, skeleton, node, removed))
    return Parsed(message, raw, shortened)


def _rendered(raw: bytes, skeleton: _ranges.Skeleton, node: _ranges.Node, removed: int) -> int:
    """The removed lines as `as_bytes()` writes them: every line end becomes CRLF, so a
    bare LF (the only other line end a shortened body may have) adds one byte."""
    kept = skeleton.data
    start, end = skeleton.at(node.body), skeleton.at(node.end)
    lf = raw.count(b"\n", node.body, node.end) - kept.count(b"\n", start, end)
    crlf = raw.count(b"\r\n", node.body, node.end) - kept.count(b"\r\n", start, end)
    return removed + lf - crlf


__all__ = ["LEAN_BYTES", "Parsed", "parse_message"]
