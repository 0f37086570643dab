"""Replace every attachment with a password-protected ZIP; leave the body byte-identical.

"Attachment" is `policies.mime.walk_attachments`, the definition the facts use, so what
a rule inspected is what gets protected. A message without attachments to protect is
returned as the very same bytes, without the `X-Sekisho-Protected` header.

How the output is made:
- Spliced (the usual path): the decision is taken on a parsed skeleton of the message
  whose long base64 bodies are shortened (`_ranges`), which parses to the same parts
  and names. Each protected part's byte range in the raw message is then replaced by
  the ZIP part, and every other byte is copied untouched, by construction. Attachments
  are decoded from the raw bytes with `binascii`, never through the email package.
- Parsed (the fallback): when the scanned ranges and the parsed skeleton disagree in
  any way (defects, bare CRs, delivery reports, a message that is itself the
  attachment), the message is parsed whole and re-serialised with
  `policies.mime.SMTP_POLICY` (refold_source="none"), which also keeps untouched
  parts byte for byte, at a quarter of the speed.

Choices made here:
- `per_file`: `見積書.xlsx` becomes `見積書.xlsx.zip`, keeping the original extension
  visible so two files of the same stem stay distinguishable.
- `bundle`: one `attachments.zip` (or `bundle_name`) replaces the first attachment; the
  others are removed.
- A forwarded `message/rfc822` that is an attachment is zipped whole as `.eml`; the
  files inside it travel inside that ZIP.
- An attachment that is already an encrypted ZIP or PDF is left alone and reported in
  `EncryptResult.skipped`.
- Already-compressed data is stored, not deflated (magic bytes, and a deflate probe of
  the first 64 KiB for anything unrecognised).
- Randomness: `random_bytes` feeds ZipCrypto's encryption headers; pyzipper draws its
  AES salts from `os.urandom` itself.

Memory (spliced path, AES): a file is decoded from the raw message a window at a time
straight into the ZIP writer, a ZIP over `SPOOL` bytes is kept in a temporary file (it
holds only ciphertext; the message itself is already in the store), and the output is
one buffer of its final size into which the untouched ranges are copied and each ZIP
is base64-encoded directly. Alive at the peak: the raw message and the output, about
twice the message, where decoding, zipping and encoding whole objects needed four.
ZipCrypto puts the CRC in the encryption header, before the data, so it still takes
each file whole. The output is a `bytearray` on this path (`bytes(...)` would copy it
once more); everything that sends it takes either.
"""

from __future__ import annotations

import base64
import binascii
import io
import operator
import os
import re
import struct
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from typing import IO, Literal, Protocol, TypeAlias
from urllib.parse import quote

import pyzipper

from policies.config import ZipMethod
from policies.mime import SMTP_POLICY, WalkLimits, parse, walk_attachments
from policies.transforms import _ranges, numpy_or_none
from policies.transforms._ranges import Node, Unsupported
from policies.transforms.zipcrypto import RandomBytes, ZipCryptoWriter

DateTime = tuple[int, int, int, int, int, int]
Mode = Literal["per_file", "bundle"]
PROTECTED_HEADER = "X-Sekisho-Protected"
_PROBE = 64 * 1024
_MAX_ZIP = 0xFFFFFFFF - (1 << 20)  # non-ZIP64 limit, with room for headers
SPOOL = 1 << 20  # a ZIP larger than this is kept in a temporary file
_WINDOW = 1 << 20  # raw base64 decoded this much at a time
# Lines of base64 encoded at a time into the output (57 file bytes make one line).
_LINES_AT_ONCE = 16384
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(_BASE64_ALPHABET)))


# The method is chosen per client in the client book; one enum for both.
__all__ = ["EncryptError", "EncryptResult", "ZipMethod", "encrypt_attachments"]


class EncryptError(ValueError):
    """The message cannot be protected; the caller must hold it, never send it as-is."""


@dataclass(frozen=True, slots=True)
class EncryptResult:
    data: bytes | bytearray  # the raw message itself when nothing was protected
    files: int  # attachments now inside ZIPs
    skipped: tuple[str, ...]  # already encrypted, left alone
    zip_names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Target:
    part: Message
    entry_name: str


class _Source(Protocol):
    """Where a part's file comes from: the parsed part, or the raw bytes it spans."""

    def content(self, part: Message) -> bytes: ...

    def magic(self, part: Message) -> bytes: ...

    def file(self, part: Message) -> tuple[int, Iterator[bytes]]:
        """The file's size, and the file in pieces; the first piece holds at least the
        first `_PROBE` bytes (or the whole file), for `is_compressed`."""
        ...


class _Parsed:
    def content(self, part: Message) -> bytes:
        return _content(part)

    def magic(self, part: Message) -> bytes:
        return _magic(part)

    def file(self, part: Message) -> tuple[int, Iterator[bytes]]:
        data = _content(part)
        return len(data), iter([data])


def _content(part: Message) -> bytes:
    """The file as the recipient would save it."""
    if part.get_content_type() == "message/rfc822":
        inner = part.get_payload()
        if isinstance(inner, list) and inner and isinstance(inner[0], Message):
            return inner[0].as_bytes(policy=SMTP_POLICY)
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def encrypt_attachments(
    raw: bytes,
    *,
    password: str,
    method: ZipMethod = ZipMethod.AES256,
    mode: Mode = "per_file",
    add_header: bool = True,
    date_time: DateTime,
    bundle_name: str = "attachments.zip",
    random_bytes: RandomBytes = os.urandom,
) -> EncryptResult:
    """Protect every attachment of `raw` with `password`; see the module docstring."""
    if not password:
        raise EncryptError("an empty password protects nothing")
    zipper = _Zipper(password, method, date_time, random_bytes)
    header = f"zip-{method.value}; files={{}}" if add_header else None
    try:
        return _spliced(raw, zipper, mode, header, bundle_name)
    except Unsupported:
        pass
    message = parse(raw)
    targets, skipped = _select(message, _Parsed())
    if not targets:
        return EncryptResult(raw, 0, skipped, ())
    zip_names: tuple[str, ...]
    if mode == "bundle":
        zip_names = (_bundle(message, targets, bundle_name, zipper),)
    else:
        zip_names = tuple(_per_file(targets, zipper))
    if header is not None:
        del message[PROTECTED_HEADER]  # a sender-supplied one would be a lie
        message.set_raw(PROTECTED_HEADER, header.format(len(targets)))
    return EncryptResult(message.as_bytes(policy=SMTP_POLICY), len(targets), skipped, zip_names)


def _select(message: Message, source: _Source) -> tuple[list[_Target], tuple[str, ...]]:
    """Attachments to protect, outermost first, and the names of those left alone."""
    limits = WalkLimits()
    found = list(walk_attachments(message, limits))
    if limits.exceeded:  # fail closed: an unseen attachment would go out unprotected
        raise EncryptError(f"message too complex to protect: {limits.exceeded}")
    inside_zipped: set[int] = set()
    targets: list[_Target] = []
    skipped: list[str] = []
    taken: set[str] = set()
    for index, found_part in enumerate(found, start=1):
        part = found_part.part
        if id(part) in inside_zipped:
            continue  # travels inside its forwarded message's ZIP
        if part.get_content_type() == "message/rfc822":
            inside_zipped.update(id(sub) for sub in part.walk() if sub is not part)
        elif source.magic(part).startswith((b"%PDF-", b"PK\x03\x04")) and already_encrypted(
            source.content(part)
        ):
            skipped.append(found_part.filename or f"attachment-{index}")
            continue
        name = _unique(entry_name(found_part.filename, part, index), taken)
        targets.append(_Target(part, name))
    return targets, tuple(skipped)


Buffer: TypeAlias = "bytes | memoryview | _Encoded"  # _Encoded: written only into the output
Edit = tuple[int, int, list[Buffer]]  # replace raw[start:end] with these pieces


def _spliced(
    raw: bytes, zipper: _Zipper, mode: Mode, header: str | None, bundle_name: str
) -> EncryptResult:
    """Protect by replacing byte ranges; raises `Unsupported` where it cannot vouch."""
    root = _ranges.scan(raw)
    skeleton = _ranges.skeleton(raw, root)
    message = parse(skeleton.data)
    nodes = _ranges.match(root, message, skeleton)
    source = _Raw(raw, nodes)
    targets, skipped = _select(message, source)
    if not targets:
        return EncryptResult(raw, 0, skipped, ())
    if any(nodes[id(t.part)] is root for t in targets):
        raise Unsupported("the message itself is the attachment")
    nl = b"\r\n" if raw.find(b"\n") > 0 and raw[raw.find(b"\n") - 1] == 0x0D else b"\n"
    archives: list[IO[bytes]] = []  # closed (their temporary files gone) whatever happens
    try:
        edits: list[Edit] = []
        if mode == "bundle":
            first = nodes[id(targets[0].part)]
            archives.append(zipper.archive(targets, source))
            edits.append(
                (first.start, first.end, _zip_part(raw, first, archives[-1], bundle_name, nl))
            )
            edits += _removals([nodes[id(t.part)] for t in targets[1:]], bundle_name, nl)
            zip_names: tuple[str, ...] = (bundle_name,)
        else:
            names = []
            for target in targets:  # one ZIP at a time, as in `_per_file`
                node, zip_name = nodes[id(target.part)], f"{target.entry_name}.zip"
                archives.append(zipper.archive([target], source))
                edits.append(
                    (node.start, node.end, _zip_part(raw, node, archives[-1], zip_name, nl))
                )
                names.append(zip_name)
            zip_names = tuple(names)
        if header is not None:
            block = _with_header(raw, root, header, len(targets), nl)
            edits.append((root.start, root.header_end, [block]))
        return EncryptResult(_apply(raw, edits), len(targets), skipped, zip_names)
    finally:
        for archive in archives:
            archive.close()


class _Raw:
    """Files read from the raw bytes of their scanned ranges."""

    def __init__(self, raw: bytes, nodes: dict[int, Node]) -> None:
        self._raw = raw
        self._nodes = nodes

    def content(self, part: Message) -> bytes:
        node = self._nodes[id(part)]
        if node.kind == "message":  # a forwarded message: the .eml exactly as it came
            return self._raw[node.body : node.end]
        if _ranges.transfer_encoding(node) == "base64":
            try:
                return binascii.a2b_base64(memoryview(self._raw)[node.body : node.end])
            except binascii.Error:
                raise Unsupported("base64 that only the email package repairs") from None
        return _content(part)  # only base64 bodies are shortened in the skeleton

    def file(self, part: Message) -> tuple[int, Iterator[bytes]]:
        node = self._nodes[id(part)]
        if node.kind != "message" and _ranges.transfer_encoding(node) == "base64":
            size = _decoded_size(self._raw, node.body, node.end)
            if size is not None:
                return size, _decoded(self._raw, node.body, node.end)
        data = self.content(part)
        return len(data), iter([data])

    def magic(self, part: Message) -> bytes:
        node = self._nodes[id(part)]
        if node.kind != "message" and _ranges.transfer_encoding(node) == "base64":
            head = b"".join(self._raw[node.body : min(node.end, node.body + 64)].split())[:12]
            try:
                return binascii.a2b_base64(head + b"=" * (-len(head) % 4))
            except binascii.Error:
                pass
        return self.content(part)[:8]


def _decoded_size(raw: bytes, start: int, end: int) -> int | None:
    """The size of the base64 in raw[start:end] once decoded, when it can be decoded a
    window at a time with the same result as whole: characters outside the alphabet
    (line breaks) are skipped either way, and padding may only end it. None otherwise
    (the caller decodes it whole, as before)."""
    length, padding = 0, 0
    view = memoryview(raw)
    for at in range(start, end, _WINDOW):
        kept = view[at : min(end, at + _WINDOW)].tobytes().translate(None, _NOT_BASE64)
        pad = kept.find(b"=") if not padding else 0
        if pad >= 0:
            if kept[pad:].strip(b"=") or padding + len(kept) - pad > 2:
                return None  # something after the padding, or too much of it
            padding += len(kept) - pad
        length += len(kept)
    if length % 4:
        return None
    return length // 4 * 3 - padding


def _decoded(raw: bytes, start: int, end: int) -> Iterator[bytes]:
    """raw[start:end]'s base64 decoded a window at a time (see `_decoded_size`), the
    first piece holding at least `_PROBE` bytes or everything."""
    view = memoryview(raw)
    carry, held, started = b"", b"", False
    for at in range(start, end, _WINDOW):
        kept = carry + view[at : min(end, at + _WINDOW)].tobytes().translate(None, _NOT_BASE64)
        whole = len(kept) - len(kept) % 4
        carry = kept[whole:]
        try:
            piece = binascii.a2b_base64(kept[:whole])
        except binascii.Error:
            raise Unsupported("base64 that only the email package repairs") from None
        if not started:
            held += piece
            if len(held) < _PROBE:
                continue
            piece, held, started = held, b"", True
        yield piece
    if carry:
        raise Unsupported("base64 that only the email package repairs")
    if held:
        yield held


def _zip_part(raw: bytes, node: Node, archive: IO[bytes], zip_name: str, nl: bytes) -> list[Buffer]:
    """The ZIP part that replaces `node`: its non-MIME header fields kept, byte for byte,
    and in place (as `_become_zip` does), then base64 in 76-character lines."""
    fields = [raw[start:end] for start, end in node.fields]
    if any(not f.endswith(b"\n") for f in fields):
        raise Unsupported("a header field without a line break")
    is_mime = [name.lower().startswith("content-") for name, _ in node.items]
    first_mime = is_mime.index(True) if True in is_mime else len(fields)
    kept = [f for f, mime in zip(fields, is_mime, strict=True) if not mime]
    content_type, disposition = mime_name_params(zip_name)
    new = (
        (
            f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: {disposition}\r\n"
        )
        .encode("ascii")
        .replace(b"\r\n", nl)
    )
    head = b"".join([*kept[:first_mime], new, *kept[first_mime:], nl])
    return [head, _Encoded(archive, nl)]


def _removals(removed: list[Node], note_for: str, nl: bytes) -> list[Edit]:
    """Bundle mode: drop the other attachments with their delimiter lines. A multipart
    left empty keeps a short note instead (RFC 2046 §5.1.1 wants one body part)."""
    edits: list[Edit] = []
    gone = {id(node) for node in removed}
    noted: set[int] = set()
    for node in removed:
        parent = node.parent
        if parent is None or parent.kind != "multipart":
            raise Unsupported("an attachment that is not a part of a multipart")
        if all(id(child) in gone for child in parent.children) and id(parent) not in noted:
            noted.add(id(parent))
            note = _note(note_for).as_bytes(policy=SMTP_POLICY.clone(linesep=nl.decode()))
            edits.append((node.start, node.end, [note]))
        else:
            edits.append((node.delimiter, node.stop, []))
    return edits


def _with_header(raw: bytes, root: Node, header: str, files: int, nl: bytes) -> bytes:
    """The top-level header block without any sender-supplied X-Sekisho-Protected (it
    would be a lie) and with ours last, as `del` and `set_raw` leave it."""
    if root.header_end == 0 or raw[root.header_end - 1] != 0x0A:
        raise Unsupported("a header block without a line break")
    kept = [
        raw[start:end]
        for (start, end), (name, _) in zip(root.fields, root.items, strict=True)
        if name.lower() != PROTECTED_HEADER.lower()
    ]
    line = f"{PROTECTED_HEADER}: {header.format(files)}".encode("ascii") + nl
    return b"".join([*kept, line])


def _apply(raw: bytes, edits: list[Edit]) -> bytearray:
    """The output, written once into a buffer of its final size: the ranges not edited
    are copied from `raw`, each ZIP is base64-encoded straight into its place."""
    view = memoryview(raw)
    pieces: list[Buffer] = []
    cursor = 0
    for start, end, replacement in sorted(edits, key=operator.itemgetter(0)):
        if start < cursor:
            raise Unsupported("overlapping edits")
        pieces += [view[cursor:start], *replacement]
        cursor = end
    pieces.append(view[cursor:])
    out = bytearray(sum(len(p) for p in pieces))
    target = memoryview(out)
    at = 0
    for piece in pieces:
        if isinstance(piece, _Encoded):
            at = piece.write_into(out, at)
        else:
            target[at : at + len(piece)] = piece
            at += len(piece)
    if at != len(out):  # a length worked out wrong: never send zero padding
        raise Unsupported("the output is not the length it was counted to be")
    return out


_LINE = struct.Struct("76s")


class _Encoded:
    """A ZIP as base64 in 76-character lines (RFC 2045 §6.8), each ending in `nl`, as
    `base64.encodebytes` writes them but without a Python step per line, produced only
    when written into the output."""

    def __init__(self, archive: IO[bytes], nl: bytes) -> None:
        self._archive = archive
        self._nl = nl
        archive.seek(0, io.SEEK_END)
        self._size = archive.tell()

    def __len__(self) -> int:
        encoded = (self._size + 2) // 3 * 4
        lines, tail = divmod(encoded, 76)
        return lines * (76 + len(self._nl)) + (tail + len(self._nl) if tail else 0)

    def write_into(self, out: bytearray, at: int) -> int:
        """Write at `at`; return where it ended. Closes the archive."""
        archive, nl, width = self._archive, self._nl, 76 + len(self._nl)
        np = numpy_or_none()
        archive.seek(0)
        try:
            while chunk := archive.read(57 * _LINES_AT_ONCE):
                encoded = binascii.b2a_base64(chunk, newline=False)
                whole = len(encoded) // 76
                if np is not None and whole:
                    rows = np.frombuffer(out, dtype=np.uint8, count=whole * width, offset=at)
                    rows = rows.reshape(whole, width)
                    rows[:, :76] = np.frombuffer(encoded, dtype=np.uint8, count=whole * 76).reshape(
                        whole, 76
                    )
                    rows[:, 76:] = np.frombuffer(nl, dtype=np.uint8)
                elif whole:
                    lines = nl.join(
                        map(operator.itemgetter(0), _LINE.iter_unpack(encoded[: whole * 76]))
                    )
                    out[at : at + whole * width] = lines + nl
                at += whole * width
                tail = encoded[whole * 76 :]
                if tail:  # only the last chunk: every other one is whole lines
                    out[at : at + len(tail) + len(nl)] = tail + nl
                    at += len(tail) + len(nl)
        finally:
            archive.close()
        return at


class _Zipper:
    """Writes ZIP archives with one method and password; never shows the password."""

    def __init__(
        self, password: str, method: ZipMethod, date_time: DateTime, random_bytes: RandomBytes
    ) -> None:
        self._password = password
        self._method = method
        self._date_time = date_time
        self._random = random_bytes

    def __repr__(self) -> str:
        return f"<_Zipper method={self._method.value}>"

    def archive(self, targets: Iterable[_Target], source: _Source | None = None) -> IO[bytes]:
        """The ZIP of these files, read from `source` (the parsed parts by default):
        in memory up to `SPOOL` bytes, in a temporary file beyond."""
        source = source or _Parsed()
        out: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL)  # noqa: SIM115
        try:
            self._write(out, targets, source)
        except BaseException:
            out.close()
            raise
        if out.tell() > _MAX_ZIP:
            out.close()
            raise EncryptError("protected archive larger than 4 GiB")
        return out

    def _write(self, out: IO[bytes], targets: Iterable[_Target], source: _Source) -> None:
        if self._method is ZipMethod.ZIPCRYPTO:
            writer = ZipCryptoWriter(out, self._password, random_bytes=self._random)
            for target in targets:
                data = source.content(target.part)
                writer.add(
                    target.entry_name,
                    data,
                    date_time=self._date_time,
                    compress=not is_compressed(data),
                )
            writer.close()
        else:
            self._archive_aes(out, targets, source)

    def _archive_aes(self, out: IO[bytes], targets: Iterable[_Target], source: _Source) -> None:
        with pyzipper.AESZipFile(
            out, "w", encryption=pyzipper.WZ_AES, encryption_kwargs={"nbits": 256}
        ) as archive:
            archive.setpassword(self._password.encode("utf-8"))
            for target in targets:
                size, pieces = source.file(target.part)
                first = next(pieces, b"")
                # zipinfo_cls (AESZipInfo): it would otherwise make its own, dated from
                # the clock.
                info = archive.zipinfo_cls(target.entry_name, date_time=self._date_time)
                info.external_attr = 0o600 << 16
                info.compress_type = (
                    pyzipper.ZIP_STORED if is_compressed(first) else pyzipper.ZIP_DEFLATED
                )
                # What writestr does, a piece at a time, the size set first as it sets
                # it (it decides ZIP64, and may decide the AES version).
                info.file_size = size
                with archive.open(info, "w") as entry:
                    entry.write(first)
                    del first
                    for piece in pieces:
                        entry.write(piece)
                if info.file_size != size:
                    raise Unsupported("an attachment's decoded size was not what it counted")


def _per_file(targets: list[_Target], zipper: _Zipper) -> Iterable[str]:
    # One attachment at a time, so memory holds one file's ZIP, never all of them.
    for target in targets:
        zip_name = f"{target.entry_name}.zip"
        _become_zip(target.part, zipper.archive([target]), zip_name)
        yield zip_name


def _bundle(message: Message, targets: list[_Target], name: str, zipper: _Zipper) -> str:
    archive = zipper.archive(targets)
    parents = _parents(message)
    for target in targets[1:]:
        parent = parents[id(target.part)]
        siblings = parent.get_payload()
        assert isinstance(siblings, list)
        siblings.remove(target.part)
        if not siblings:  # RFC 2046 §5.1.1: a multipart needs at least one body part
            siblings.append(_note(name))
    _become_zip(targets[0].part, archive, name)
    return name


def _parents(message: Message) -> dict[int, Message]:
    parents: dict[int, Message] = {}
    for part in message.walk():
        payload = part.get_payload()
        if isinstance(payload, list):
            parents.update((id(child), part) for child in payload)
    return parents


def _note(zip_name: str) -> Message:
    note = Message(policy=SMTP_POLICY)
    note.set_raw("Content-Type", "text/plain; charset=utf-8")
    note.set_raw("Content-Transfer-Encoding", "base64")
    note.set_payload(base64.encodebytes(f"-> {zip_name}\n".encode()).decode("ascii"))
    return note


def _become_zip(part: Message, archive: IO[bytes], zip_name: str) -> None:
    """Turn `part` into the ZIP attachment, keeping its non-MIME headers in place."""
    kept = [(k, v) for k, v in part.raw_items() if not k.lower().startswith("content-")]
    first_mime = next(
        (i for i, (k, _) in enumerate(part.raw_items()) if k.lower().startswith("content-")),
        len(kept),
    )
    for key in {k for k, _ in part.raw_items()}:
        del part[key]
    content_type, disposition = mime_name_params(zip_name)
    new = [
        ("Content-Type", content_type),
        ("Content-Transfer-Encoding", "base64"),
        ("Content-Disposition", disposition),
    ]
    for key, value in kept[:first_mime] + new + kept[first_mime:]:
        part.set_raw(key, value)
    # base64 in 76-character lines (RFC 2045 §6.8), encoded once from the ZIP buffer.
    archive.seek(0)
    part.set_payload(base64.encodebytes(archive.read()).decode("ascii"))
    archive.close()


def mime_name_params(name: str) -> tuple[str, str]:
    """Content-Type and Content-Disposition values naming the ZIP part.

    Non-ASCII names are written twice: `name=` as RFC 2047 encoded-words inside quotes
    (the form Outlook and old clients read) and `filename*=` per RFC 2231 (UTF-8,
    percent-encoded, with §3 continuations), which RFC-conforming clients prefer.
    """
    if name.isascii() and not re.search(r'[\x00-\x1f\x7f"\\]', name):
        return f'application/zip; name="{name}"', f'attachment; filename="{name}"'
    words = "\r\n ".join(_encoded_words(name))
    return f'application/zip;\r\n name="{words}"', "attachment;" + _rfc2231("filename", name)


def _encoded_words(text: str, limit: int = 42) -> Iterable[str]:
    # RFC 2047 §2: an encoded-word is at most 75 characters, and a line at most 76; 42
    # octets make 56 base64 characters, 68 with "=?UTF-8?B?" and "?=", 75 after
    # ' name="'. §5: each word holds whole characters, so split between characters.
    chunk = b""
    for char in text:
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > limit:
            yield f"=?UTF-8?B?{base64.b64encode(chunk).decode('ascii')}?="
            chunk = b""
        chunk += encoded
    yield f"=?UTF-8?B?{base64.b64encode(chunk).decode('ascii')}?="


def _rfc2231(attribute: str, text: str, limit: int = 60) -> str:
    # RFC 2231 §4: charset''percent-encoded octets; §3: split into numbered sections,
    # between characters, so that no client has to join a character split in two.
    tokens = [quote(char, safe="!#$&+-.^_`|~") for char in text]
    sections = [""]
    for token in tokens:
        if len(sections[-1]) + len(token) > limit:
            sections.append("")
        sections[-1] += token
    if len(sections) == 1:
        return f"\r\n {attribute}*=UTF-8''{sections[0]}"
    first = f"\r\n {attribute}*0*=UTF-8''{sections[0]}"
    rest = "".join(f";\r\n {attribute}*{i}*={s}" for i, s in enumerate(sections[1:], 1))
    return first + rest


def _magic(part: Message) -> bytes:
    """The first bytes of the file, without decoding all of it (a 25 MB base64 decode
    only to learn that a file is not a ZIP or PDF would double the work)."""
    payload = part.get_payload()
    if isinstance(payload, str) and part.get("content-transfer-encoding", "").lower() == "base64":
        head = "".join(payload[:64].split())[:12]
        try:
            return base64.b64decode(head + "=" * (-len(head) % 4))
        except ValueError:
            pass
    return _content(part)[:8]


def entry_name(filename: str | None, part: Message, index: int) -> str:
    """The name inside the ZIP: the decoded filename without any directory part."""
    name = re.sub(r"[\x00-\x1f\x7f]", "", (filename or "").replace("\\", "/")).split("/")[-1]
    if name.strip(". "):
        return name.strip()
    extension = ".eml" if part.get_content_type() == "message/rfc822" else ".bin"
    return f"attachment-{index}{extension}"


def _unique(name: str, taken: set[str]) -> str:
    stem, dot, extension = name.rpartition(".")
    if not dot:
        stem, extension = name, ""
    candidate, n = name, 1
    while candidate.casefold() in taken:  # Windows paths are case-insensitive
        n += 1
        candidate = f"{stem} ({n}){dot}{extension}"
    taken.add(candidate.casefold())
    return candidate


_COMPRESSED_MAGIC = (
    b"%PDF-",
    b"PK\x03\x04",
    b"PK\x05\x06",  # pdf; zip, docx/xlsx/pptx/odf, jar
    b"\x89PNG",
    b"\xff\xd8\xff",
    b"GIF8",  # png, jpeg, gif
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ\x00",
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!",  # archives
)


def is_compressed(data: bytes) -> bool:
    """True when deflate would gain nothing: known compressed formats by magic bytes, or
    a level-1 deflate of the first 64 KiB saving under 3 %."""
    if data.startswith(_COMPRESSED_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return True
    if data[4:8] == b"ftyp":  # ISO media: mp4, mov, heic
        return True
    sample = data[:_PROBE]
    return len(sample) >= 1024 and len(zlib.compress(sample, 1)) > len(sample) * 0.97


_PDF_ENCRYPT = re.compile(rb"/Encrypt\s*(?:\d+\s+\d+\s+R|<<)")


def already_encrypted(data: bytes) -> bool:
    """An encrypted ZIP (every file entry has APPNOTE 4.4.4 bit 0) or an encrypted PDF
    (a trailer or cross-reference stream with /Encrypt, ISO 32000-1 §7.6.1)."""
    if data.startswith(b"%PDF-"):
        return _PDF_ENCRYPT.search(data) is not None
    if data.startswith(b"PK\x03\x04"):
        return _zip_encrypted(data)
    return False


def _zip_encrypted(data: bytes) -> bool:
    try:
        with pyzipper.ZipFile(io.BytesIO(data)) as archive:
            files = [i for i in archive.infolist() if not i.is_dir()]
    except (pyzipper.BadZipFile, ValueError, OSError, EOFError):
        return False  # not a readable ZIP: protect it like any other file
    return bool(files) and all(i.flag_bits & 0x1 for i in files)
