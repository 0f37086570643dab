"""Everything the rules look at, read once from the raw message and the envelope.

`build_facts` is the only place that touches MIME. Rules then read plain immutable
values, so a condition is a small function of `MessageFacts` and a table of tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message

from policies.clients import ClientBook, domain_matches, domain_of
from policies.detectors import Finding, detect
from policies.envelope import Envelope
from policies.extract import Budget, contents, decode_text
from policies.filetype import FileType, extension_of
from policies.filetype import detect as detect_type
from policies.mime import LeafPart, WalkLimits, walk_parts
from policies.parsed import Parsed
from policies.text import html_to_text, normalize

MAX_HEADERS = 200
MAX_HEADER_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    domain: str
    internal: bool
    client: str | None  # the client company the domain belongs to, if any


@dataclass(frozen=True, slots=True)
class Mark:
    """A client's marker found on an attachment, and where: its name, an entry, its text."""

    client: str
    marker: str
    where: str


@dataclass(frozen=True, slots=True)
class AttachmentFacts:
    name: str | None
    declared_type: str
    extension: str
    detected_type: FileType
    size: int
    encrypted: bool
    inside_message: bool
    entries: tuple[str, ...]  # names inside a plain ZIP, one level
    marks: tuple[Mark, ...]
    pii: tuple[Finding, ...]

    @property
    def label(self) -> str:
        return self.name or f"(unnamed {self.declared_type})"

    @property
    def clients(self) -> frozenset[str]:
        return frozenset(m.client for m in self.marks)

    @property
    def types(self) -> frozenset[str]:
        """What `attachment_type` matches: the detected type, the extension, the subtype."""
        subtype = self.declared_type.rpartition("/")[2]
        return frozenset(t for t in (self.detected_type.value, self.extension, subtype) if t)


@dataclass(frozen=True, slots=True)
class MessageFacts:
    sender: str
    sender_domain: str
    sender_user: str | None
    sender_groups: tuple[str, ...]
    recipients: tuple[Recipient, ...]
    subject: str | None
    headers: tuple[tuple[str, str], ...]  # raw, undecoded apart from Subject
    body_text: str  # NFKC-normalised plain text, HTML reduced to text
    body_pii: tuple[Finding, ...]
    attachments: tuple[AttachmentFacts, ...]
    not_fully_inspected: tuple[str, ...]  # why, when a limit stopped inspection
    # why the walk stopped before some parts (too deep, too many): they were never
    # looked at, so no rule could have matched them
    unwalked: str | None = None

    @property
    def external(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if not r.internal)


def build_facts(
    parsed: Parsed, envelope: Envelope, book: ClientBook, internal_domains: Sequence[str]
) -> MessageFacts:
    message = parsed.message
    budget = Budget()
    limits = WalkLimits()
    leaves = list(walk_parts(message, limits))
    attachments = tuple(
        _attachment(parsed, leaf, book, budget) for leaf in leaves if leaf.attachment
    )
    body = budget.take(
        normalize(_body_text(parsed, [leaf for leaf in leaves if not leaf.attachment])), "body"
    )
    cut = [*([limits.exceeded] if limits.exceeded else []), *budget.cut]
    cut.extend(
        f"{a.label}: {a.detected_type.value} archive not inspected"
        for a in attachments
        if a.detected_type in _OPAQUE and not a.encrypted
    )
    return MessageFacts(
        sender=envelope.mail_from,
        sender_domain=domain_of(envelope.mail_from),
        sender_user=envelope.sender_user,
        sender_groups=envelope.sender_groups,
        recipients=tuple(_recipient(r, book, internal_domains) for r in envelope.rcpt_tos),
        subject=subject_of(message),
        headers=_headers(message),
        body_text=body,
        body_pii=detect(body),
        attachments=attachments,
        not_fully_inspected=tuple(cut),
        unwalked=limits.exceeded,
    )


_OPAQUE = {FileType.SEVEN_Z, FileType.RAR, FileType.GZIP}


def _recipient(address: str, book: ClientBook, internal_domains: Sequence[str]) -> Recipient:
    domain = domain_of(address)
    internal = domain_matches(domain, internal_domains)
    client = None if internal else book.client_for(address)
    return Recipient(address, domain, internal, client.name if client else None)


def subject_of(message: Message) -> str | None:
    raw = _raw_header(message, "subject")
    if raw is None:
        return None
    # The header parser costs tens of µs, for a subject of plain ASCII without an
    # encoded word (RFC 2047) only to join its folded lines: do just that. The parser
    # gets the rest (8-bit bytes arrive as surrogates, which are not ASCII).
    unfolded = raw.replace("\r", "").replace("\n", "")
    if unfolded.isascii() and "=?" not in unfolded:
        return unfolded
    try:
        subject = message.get("subject")
    except (ValueError, LookupError, TypeError, AttributeError, IndexError):
        subject = raw
    return None if subject is None else str(subject)


def _raw_header(message: Message, name: str) -> str | None:
    return next((str(v) for k, v in message.raw_items() if k.lower() == name), None)


def _headers(message: Message) -> tuple[tuple[str, str], ...]:
    items = message.raw_items()
    return tuple((k, str(v)[:MAX_HEADER_CHARS]) for k, v in list(items)[:MAX_HEADERS])


def _body_text(parsed: Parsed, leaves: Sequence[LeafPart]) -> str:
    """Text the recipient reads: text/plain and text/html leaves that are not attachments.

    Bodies of forwarded message/rfc822 parts count: they are read too.
    """
    texts = []
    for leaf in leaves:
        kind = leaf.content_type
        if kind in ("text/plain", "text/html"):
            text = _decoded_text(parsed, leaf.part)
            texts.append(html_to_text(text) if kind == "text/html" else text)
    return "\n".join(texts)


def _decoded_text(parsed: Parsed, part: Message) -> str:
    return decode_text(parsed.payload(part), part.get_content_charset())


def _attachment(
    parsed: Parsed, found: LeafPart, book: ClientBook, budget: Budget
) -> AttachmentFacts:
    part, name = found.part, found.filename
    declared = found.content_type
    data, size = _payload(parsed, part, declared)
    extension = extension_of(name)
    kind = FileType.EML if declared == "message/rfc822" else detect_type(data, extension, declared)
    inner = contents(data, kind, part.get_content_charset(), name or declared, budget)
    text = normalize(inner.text)
    return AttachmentFacts(
        name=name,
        declared_type=declared,
        extension=extension,
        detected_type=kind,
        size=size,
        encrypted=inner.encrypted,
        inside_message=found.inside_message,
        entries=inner.entries,
        marks=_marks(book, name, inner.entries, text),
        pii=detect(text),
    )


def _payload(parsed: Parsed, part: Message, declared: str) -> tuple[bytes, int]:
    if declared == "message/rfc822":
        # The inner message's own parts are walked separately; here only its size.
        return b"", _message_size(parsed, part)
    data = parsed.payload(part)
    return data, len(data)


def _message_size(parsed: Parsed, part: Message) -> int:
    inner = part.get_payload()
    if not isinstance(inner, list):
        return 0
    try:
        return sum(parsed.serialized_size(m) for m in inner if isinstance(m, Message))
    except (ValueError, LookupError, TypeError, UnicodeError):  # unserialisable: size unknown
        return 0


def _marks(
    book: ClientBook, name: str | None, entries: tuple[str, ...], text: str
) -> tuple[Mark, ...]:
    found = [Mark(h.client, h.marker, "name") for h in book.markers_in(name or "")]
    for entry in entries:
        found.extend(Mark(h.client, h.marker, f"entry {entry}") for h in book.markers_in(entry))
    found.extend(Mark(h.client, h.marker, "text") for h in book.markers_in_folded(text.casefold()))
    return tuple(found)
