"""Text and names inside an attachment, cheap and bounded.

Only what can be read without running anything: text files, the XML of Office Open
XML documents (ECMA-376), and the entry names of a plain ZIP (one level). Every read
is bounded by a `Budget`; what is left unread is recorded as a reason, which becomes
the `not_fully_inspected` fact instead of a silent skip.
"""

from __future__ import annotations

import html
import io
import re
import zipfile
from dataclasses import dataclass, field

from policies.filetype import FileType
from policies.mime import decode_8bit
from policies.text import html_to_text

# Sized so that a message with a 5 MB spreadsheet is inspected in tens of
# milliseconds (bench/policy.py); what lies beyond is reported, not skipped silently.
MAX_PART_TEXT = 256 * 1024  # characters of text taken from one attachment or body
MAX_TOTAL_TEXT = 1024 * 1024  # characters over the whole message
MAX_MEMBER_BYTES = 512 * 1024  # decompressed XML read from one OOXML member (~15 ms/MiB to strip)
MAX_ZIP_ENTRIES = 1000
# A ZIP entry that claims to expand beyond these is a compression bomb (1 GiB of zeros
# deflates to 1 MiB). Its content is never decompressed here; the fact is reported, so
# a rule on `not_fully_inspected` can hold it for a person.
MAX_ZIP_RATIO = 100
MAX_ZIP_EXPANDED = 256 * 1024 * 1024

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError,
               NotImplementedError, RuntimeError, KeyError)
_TEXTUAL = {FileType.TXT, FileType.CSV, FileType.TSV, FileType.JSON, FileType.XML,
            FileType.HTML, FileType.EML}
_OOXML_PARTS = {
    FileType.DOCX: re.compile(r"word/(?:document|header\d*|footer\d*|footnotes|comments)\.xml"),
    FileType.XLSX: re.compile(r"xl/(?:sharedStrings|worksheets/sheet\d+|comments\d*)\.xml"),
    FileType.PPTX: re.compile(r"ppt/(?:slides/slide\d+|notesSlides/notesSlide\d+)\.xml"),
}
_CORE_PROPS = "docProps/core.xml"
# Closing a paragraph, cell, row or string item ends a line; other tags join runs,
# because Word splits one typed number over several <w:t> runs.
_XML_BREAK = re.compile(r"</(?:w:p|a:p|c|si|row|t)>|<w:tab/>|<w:br/>")
_XML_TAG = re.compile(r"<[^>]*>")
_ENCRYPTED_OLE = "EncryptedPackage".encode("utf-16-le")


@dataclass(slots=True)
class Budget:
    """Characters of text the message may still contribute, and what was cut."""

    remaining: int = MAX_TOTAL_TEXT
    cut: list[str] = field(default_factory=list)

    def take(self, text: str, where: str, part_left: int = MAX_PART_TEXT) -> str:
        """`text` cut to what the message and the part (`part_left`) may still add."""
        limit = max(0, min(part_left, self.remaining))
        if len(text) > limit:
            self.cut.append(f"{where}: text beyond {limit} characters not inspected")
            text = text[:limit]
        self.remaining -= len(text)
        return text


@dataclass(frozen=True, slots=True)
class Contents:
    text: str = ""
    entries: tuple[str, ...] = ()
    encrypted: bool = False


def contents(
    data: bytes, kind: FileType, charset: str | None, where: str, budget: Budget
) -> Contents:
    if kind in _TEXTUAL:
        return Contents(text=_text_file(data, kind, charset, where, budget))
    if kind in _OOXML_PARTS:
        return _ooxml(data, kind, where, budget)
    if kind is FileType.ZIP:
        return _zip(data, where, budget)
    if kind is FileType.PDF:
        return Contents(encrypted=pdf_encrypted(data))
    if kind is FileType.OLE:
        return Contents(encrypted=_ENCRYPTED_OLE in data)
    return Contents()


def _text_file(data: bytes, kind: FileType, charset: str | None, where: str, budget: Budget) -> str:
    limit = budget_bytes(budget)
    if len(data) > limit:
        budget.cut.append(f"{where}: text beyond {limit} bytes not inspected")
    text = decode_text(data[:limit], charset)
    return budget.take(html_to_text(text) if kind is FileType.HTML else text, where)


def budget_bytes(budget: Budget) -> int:
    # A character is at most 4 bytes in UTF-8 (and 2 in CP932): read no more than that.
    return 4 * min(MAX_PART_TEXT, max(budget.remaining, 0))


def decode_text(data: bytes, charset: str | None) -> str:
    if b"\x1b$B" in data[:4096] or b"\x1b$@" in data[:4096]:  # RFC 1468 escape sequences
        charset = "iso-2022-jp"
    if charset:
        try:
            return data.decode(charset, "replace")
        except LookupError:
            pass
    return decode_8bit(data)


def pdf_encrypted(data: bytes) -> bool:
    """ISO 32000-1 §7.6: an encrypted PDF has an /Encrypt entry in its trailer."""
    return b"/Encrypt" in data


def xml_text(xml: str) -> str:
    return html.unescape(_XML_TAG.sub("", _XML_BREAK.sub("\n", xml)))


def _ooxml(data: bytes, kind: FileType, where: str, budget: Budget) -> Contents:
    wanted = _OOXML_PARTS[kind]
    chunks: list[str] = []
    part_left = MAX_PART_TEXT  # shared by all the document's members
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in sorted(archive.infolist(), key=_reading_order):
                if info.filename != _CORE_PROPS and not wanted.fullmatch(info.filename):
                    continue
                if min(budget.remaining, part_left) <= 0:
                    budget.cut.append(f"{where}: {info.filename} not read (text budget spent)")
                    continue
                xml = _read_member(archive, info, where, budget)
                chunks.append(budget.take(xml_text(xml), f"{where} › {info.filename}", part_left))
                part_left -= len(chunks[-1])
    except _ZIP_ERRORS as error:
        budget.cut.append(f"{where}: unreadable {kind.value} ({type(error).__name__})")
    return Contents(text="\n".join(chunks))


def _reading_order(info: zipfile.ZipInfo) -> tuple[bool, str]:
    # Excel keeps typed text (names, card numbers typed as text) in sharedStrings.xml,
    # which it writes after the sheets: read it first, so a budget cut loses numbers.
    return (not info.filename.endswith("sharedStrings.xml"), info.filename)


def _read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, budget: Budget
) -> str:
    limit = min(MAX_MEMBER_BYTES, budget_bytes(budget))
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        budget.cut.append(f"{where}: {info.filename} beyond {limit} bytes not inspected")
        data = data[:limit]
    return data.decode("utf-8", "replace")


def _zip(data: bytes, where: str, budget: Budget) -> Contents:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except _ZIP_ERRORS as error:
        budget.cut.append(f"{where}: unreadable zip ({type(error).__name__})")
        return Contents(encrypted=_local_header_encrypted(data))
    if len(infos) > MAX_ZIP_ENTRIES:
        budget.cut.append(f"{where}: more than {MAX_ZIP_ENTRIES} entries, the rest not listed")
    budget.cut.extend(_bomb_entries(infos[:MAX_ZIP_ENTRIES], where))
    # APPNOTE.TXT 4.4.4: bit 0 of the general purpose flag means the entry is encrypted.
    encrypted = any(info.flag_bits & 0x1 for info in infos)
    names = tuple(entry_name(info) for info in infos[:MAX_ZIP_ENTRIES] if not info.is_dir())
    return Contents(entries=names, encrypted=encrypted)


def _bomb_entries(infos: list[zipfile.ZipInfo], where: str) -> list[str]:
    """Entries whose declared size is absurd for their compressed size, and a total
    beyond reason: the sizes come from the central directory, nothing is inflated."""
    reasons = []
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > MAX_ZIP_RATIO and info.file_size > 1024 * 1024:
            reasons.append(f"{where}: {entry_name(info)} expands {ratio:.0f}x to "
                           f"{info.file_size} bytes (a compression bomb), not inspected")
    total = sum(info.file_size for info in infos)
    if total > MAX_ZIP_EXPANDED and not reasons:
        reasons.append(f"{where}: expands to {total} bytes, not inspected")
    return reasons


def entry_name(info: zipfile.ZipInfo) -> str:
    """APPNOTE.TXT 4.4.4 bit 11 marks UTF-8 names; without it, Japanese Windows writes CP932."""
    if info.flag_bits & 0x800:
        return info.filename
    try:
        return decode_8bit(info.filename.encode("cp437"))
    except UnicodeEncodeError:
        return info.filename


def _local_header_encrypted(data: bytes) -> bool:
    return data.startswith(b"PK\x03\x04") and len(data) > 7 and bool(data[6] & 0x1)
