"""What counts as an attachment, and what it is called.

Facts and the encryption transform both walk a message with `walk_attachments`, so
"an attachment" means the same thing to the rule that inspects it and to the
transform that protects it. Attachments hide in several places (FIELD-NOTES):
`Content-Disposition: attachment`, `inline` parts with a filename, parts that carry
only `Content-Type; name=`, and parts of a nested `message/rfc822`.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email import policy as email_policy
from email.message import EmailMessage, Message
from email.parser import BytesParser

from policies.header_cache import EmailPolicy, InspectionPolicy

# policy.SMTP emits CRLF; refold_source="none" keeps parsed headers byte-identical
# (a re-folded ISO-2022-JP Subject or DKIM-Signature would come back changed).
SMTP_POLICY = email_policy.SMTP.clone(refold_source="none")

# Only for parsing what is inspected: messages that are changed and sent keep SMTP_POLICY.
INSPECTION_POLICY = InspectionPolicy(linesep="\r\n", refold_source="none")

MAX_DEPTH = 20
MAX_PARTS = 2000

_PARAM = re.compile(rb'(?:file)?name\*?=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))', re.IGNORECASE)


def parse(raw: bytes, policy: EmailPolicy = SMTP_POLICY) -> EmailMessage:
    """Parse raw message bytes with the policy that round-trips them unchanged."""
    message = BytesParser(policy=policy).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


@dataclass(frozen=True, slots=True)
class AttachmentPart:
    part: Message
    filename: str | None
    depth: int
    inside_message: bool  # found inside a nested message/rfc822


@dataclass(slots=True)
class WalkLimits:
    """Counts what a walk saw; `exceeded` says it stopped early."""

    max_depth: int = MAX_DEPTH
    max_parts: int = MAX_PARTS
    parts_seen: int = 0
    exceeded: str | None = None


def _declared_attachment(part: Message, filename: str | None) -> bool:
    return filename is not None or part.get_content_disposition() == "attachment"


@dataclass(frozen=True, slots=True)
class LeafPart:
    """A part the walk reached: an attachment (with its filename) or body."""

    part: Message
    filename: str | None
    attachment: bool
    depth: int
    inside_message: bool
    content_type: str  # part.get_content_type(), read once


def walk_attachments(
    message: Message, limits: WalkLimits | None = None
) -> Iterator[AttachmentPart]:
    """Yield every attachment, depth first, including those inside message/rfc822 parts.

    A message/rfc822 part that is itself declared an attachment is yielded whole (a
    forwarded .eml is one file to the recipient), and its inner attachments are then
    yielded as well, flagged `inside_message`, so that inspection sees them.
    """
    for leaf in walk_parts(message, limits):
        if leaf.attachment:
            yield AttachmentPart(leaf.part, leaf.filename, leaf.depth, leaf.inside_message)


def walk_parts(message: Message, limits: WalkLimits | None = None) -> Iterator[LeafPart]:
    """Every attachment and every body leaf, in one bounded walk.

    `walk_attachments` is this walk's attachments; inspection also reads the body
    leaves, so it walks once. Each header is parsed once per part here, because the
    email package re-parses a header on every access.
    """
    limits = limits if limits is not None else WalkLimits()
    yield from _walk(message, 0, False, limits)


def _walk(part: Message, depth: int, inside: bool, limits: WalkLimits) -> Iterator[LeafPart]:
    limits.parts_seen += 1
    if limits.parts_seen > limits.max_parts:
        limits.exceeded = limits.exceeded or f"more than {limits.max_parts} parts"
        return
    if depth > limits.max_depth:
        limits.exceeded = limits.exceeded or f"nested deeper than {limits.max_depth}"
        return
    content_type = part.get_content_type()
    if content_type == "message/rfc822":
        name = filename_of(part)
        if _declared_attachment(part, name):
            yield LeafPart(part, name, True, depth, inside, content_type)
        payload = part.get_payload()
        inner = payload if isinstance(payload, list) else [payload]
        for sub in inner:
            if isinstance(sub, Message):
                yield from _walk(sub, depth + 1, True, limits)
        return
    if part.is_multipart():
        payload = part.get_payload()
        if isinstance(payload, list):
            for sub in payload:
                if isinstance(sub, Message):
                    yield from _walk(sub, depth + 1, inside, limits)
        return
    name = filename_of(part)
    yield LeafPart(part, name, _declared_attachment(part, name), depth, inside, content_type)


def filename_of(part: Message) -> str | None:
    """The decoded filename, from Content-Disposition or else Content-Type `name=`.

    RFC 2231 and the common RFC 2047-inside-quotes form are decoded by the email
    package. Raw 8-bit names (as `swaks --attach-name` or old Japanese clients send)
    come back with replacement characters; those are decoded from the raw header
    bytes, trying UTF-8 and then CP932 (Shift_JIS as Windows writes it).
    """
    try:
        # get_filename falls back to Content-Type `name=` by itself.
        name = part.get_filename()
    except (ValueError, LookupError, TypeError):  # broken RFC 2231/2047 in Content-Disposition
        name = _content_type_name(part)
    if name is None:
        return _raw_8bit_name(part)
    if "\ufffd" in name or _has_surrogates(name):
        return _raw_8bit_name(part) or name.encode("utf-8", "replace").decode("utf-8")
    return name.strip() or None


def _content_type_name(part: Message) -> str | None:
    try:
        name = part.get_param("name", header="content-type")
    except (ValueError, LookupError, TypeError):
        return None
    if isinstance(name, tuple):  # RFC 2231 triple that get_param did not collapse
        return _collapse(name)
    return name


def _collapse(value: tuple[str | None, str | None, str]) -> str:
    charset, _, text = value
    try:
        return text.encode("latin-1", "surrogateescape").decode(charset or "utf-8", "replace")
    except LookupError:
        return text


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _raw_8bit_name(part: Message) -> str | None:
    for header in ("content-disposition", "content-type"):
        for key, value in part.raw_items():
            if key.lower() != header:
                continue
            raw = str(value).encode("ascii", "surrogateescape")
            if all(b < 0x80 for b in raw):
                continue
            match = _PARAM.search(raw)
            if match:
                return decode_8bit(match.group(1) or match.group(2))
    return None


def decode_8bit(raw: bytes) -> str:
    for charset in ("utf-8", "cp932"):
        try:
            return raw.decode(charset)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def decoded_payload(part: Message) -> bytes:
    """The part's body with its Content-Transfer-Encoding undone.

    Base64 (RFC 2045 §6.8) is decoded in one call: `get_payload(decode=True)` splits,
    re-joins and validates the lines first, which is four times slower on a 5 MB
    attachment. Like the email package, characters outside the alphabet are ignored;
    anything the fast path cannot decode goes to the email package.
    """
    if _transfer_encoding(part) == "base64":
        payload = part.get_payload()
        try:
            if isinstance(payload, str):
                return binascii.a2b_base64(payload.encode("ascii", "surrogateescape"))
        except (binascii.Error, UnicodeEncodeError):
            pass
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def _transfer_encoding(part: Message) -> str:
    """The raw header value: parsing it through the header registry costs more."""
    for name, value in part.raw_items():
        if name.lower() == "content-transfer-encoding":
            return str(value).strip().lower()
    return ""
