"""What a file is, from its first bytes, not from the name the sender gave it.

A ZIP container is looked into (its central directory, not its data) to tell
docx/xlsx/pptx from a plain ZIP (ECMA-376 Part 2: the `[Content_Types].xml` part and
the `word/`, `xl/`, `ppt/` folders). A file without magic bytes is text if it decodes
as text, and then takes the kind its extension names (csv, json, …).
"""

from __future__ import annotations

import io
import zipfile
from enum import StrEnum


class FileType(StrEnum):
    PDF = "pdf"
    ZIP = "zip"
    DOCX = "docx"
    XLSX = "xlsx"
    PPTX = "pptx"
    OLE = "ole"  # legacy doc/xls/ppt/msg, and password-protected Office files
    SEVEN_Z = "7z"
    RAR = "rar"
    GZIP = "gz"
    PNG = "png"
    JPEG = "jpeg"
    GIF = "gif"
    EXE = "exe"
    EML = "eml"
    TXT = "txt"
    CSV = "csv"
    TSV = "tsv"
    JSON = "json"
    XML = "xml"
    HTML = "html"
    BINARY = "binary"


_MAGIC: tuple[tuple[bytes, FileType], ...] = (
    (b"%PDF-", FileType.PDF),
    (b"PK\x03\x04", FileType.ZIP),
    (b"PK\x05\x06", FileType.ZIP),  # an empty archive
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", FileType.OLE),
    (b"7z\xbc\xaf\x27\x1c", FileType.SEVEN_Z),
    (b"Rar!\x1a\x07", FileType.RAR),
    (b"\x1f\x8b", FileType.GZIP),
    (b"\x89PNG\r\n\x1a\n", FileType.PNG),
    (b"\xff\xd8\xff", FileType.JPEG),
    (b"GIF8", FileType.GIF),
    (b"MZ", FileType.EXE),
)

_TEXT_KINDS = {
    "csv": FileType.CSV, "tsv": FileType.TSV, "json": FileType.JSON, "xml": FileType.XML,
    "html": FileType.HTML, "htm": FileType.HTML, "txt": FileType.TXT, "eml": FileType.EML,
}
_TEXT_DECLARED = {
    "text/csv": FileType.CSV, "text/tab-separated-values": FileType.TSV,
    "application/json": FileType.JSON, "text/xml": FileType.XML,
    "application/xml": FileType.XML, "text/html": FileType.HTML,
    "message/rfc822": FileType.EML,
}
_OOXML = (("word/", FileType.DOCX), ("xl/", FileType.XLSX), ("ppt/", FileType.PPTX))

SNIFF_BYTES = 4096


def detect(data: bytes, extension: str, declared: str) -> FileType:
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return _ooxml_kind(data) if kind is FileType.ZIP else kind
    if looks_like_text(data[:SNIFF_BYTES]):
        return _TEXT_DECLARED.get(declared) or _TEXT_KINDS.get(extension, FileType.TXT)
    return FileType.BINARY


def looks_like_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    for charset in ("utf-8", "cp932", "iso-2022-jp"):
        try:
            head.decode(charset)
        except UnicodeDecodeError as error:
            if charset == "utf-8" and error.start >= len(head) - 3:
                return True  # a multi-byte character cut by the sniff window
            continue
        return True
    return False


def _ooxml_kind(data: bytes) -> FileType:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, NotImplementedError):
        return FileType.ZIP
    if "[Content_Types].xml" not in names:
        return FileType.ZIP
    for prefix, kind in _OOXML:
        if any(n.startswith(prefix) for n in names):
            return kind
    return FileType.ZIP


def extension_of(name: str | None) -> str:
    if not name or "." not in name:
        return ""
    return name.rsplit(".", 1)[1].strip().lower()
