"""Real-shaped messages and files, built in code rather than kept as binary fixtures.

Each builder writes the bytes the way a real client does (CRLF, its header style),
because the point is to catch the forms that real senders produce.
"""

from __future__ import annotations

import base64
import io
import urllib.parse
import zipfile
from email.header import Header

import pyzipper

CRLF = "\r\n"
XLSX_TYPE = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
PPTX_TYPE = "application/vnd.openxmlformats-officedocument.presentationml.presentation"


def b64(data: bytes) -> str:
    text = base64.b64encode(data).decode("ascii")
    return CRLF.join(text[i : i + 76] for i in range(0, len(text), 76))


def headers(subject: str = "test", sender: str = "taro@corp.example",
            to: str = "hanako@acme.example") -> str:
    return (f"From: {sender}{CRLF}To: {to}{CRLF}Subject: {subject}{CRLF}"
            f"Date: Mon, 15 Jan 2024 10:00:00 +0900{CRLF}Message-ID: <t@corp.example>{CRLF}"
            f"MIME-Version: 1.0{CRLF}")


def plain(body: str, subject: str = "test", **kw: str) -> bytes:
    return (headers(subject, **kw) + f"Content-Type: text/plain; charset=utf-8{CRLF}"
            f"Content-Transfer-Encoding: 8bit{CRLF}{CRLF}{body}{CRLF}").encode("utf-8")


def mixed(body: str, parts: list[str], subject: str = "test", **kw: str) -> bytes:
    """multipart/mixed with a UTF-8 text body and the given ready-made parts."""
    boundary = "----=_Part_0_1234"
    text = (f"Content-Type: text/plain; charset=utf-8{CRLF}"
            f"Content-Transfer-Encoding: base64{CRLF}{CRLF}{b64(body.encode())}{CRLF}")
    chunks = [text, *parts]
    joined = "".join(f"--{boundary}{CRLF}{c}" for c in chunks)
    return (headers(subject, **kw) + f'Content-Type: multipart/mixed; boundary="{boundary}"'
            f"{CRLF}{CRLF}{joined}--{boundary}--{CRLF}").encode("utf-8", "surrogateescape")


def part(data: bytes, content_type: str, disposition: str = "") -> str:
    dispo = f"Content-Disposition: {disposition}{CRLF}" if disposition else ""
    return (f"Content-Type: {content_type}{CRLF}{dispo}"
            f"Content-Transfer-Encoding: base64{CRLF}{CRLF}{b64(data)}{CRLF}")


def attachment(name: str, data: bytes, content_type: str = "application/octet-stream") -> str:
    """A plain attachment with an ASCII-safe RFC 2231 name (as most clients now write)."""
    quoted = urllib.parse.quote(name)
    return part(data, f"{content_type}", f"attachment; filename*=UTF-8''{quoted}")


def simple(body: str, files: list[tuple[str, bytes, str]], subject: str = "test",
           **kw: str) -> bytes:
    return mixed(body, [attachment(n, d, t) for n, d, t in files], subject, **kw)


def outlook_iso2022jp(name: str, data: bytes, content_type: str = XLSX_TYPE) -> bytes:
    """Outlook: ISO-2022-JP subject and body, RFC 2047 encoded-word inside quotes."""
    word = Header(name, "iso-2022-jp").encode()
    subject = Header("お見積りの件", "iso-2022-jp").encode()
    body = "お世話になっております。\r\n見積書を送付します。\r\n".encode("iso-2022-jp")
    boundary = "_002_OUTLOOK"
    raw = (headers(subject) + f'Content-Type: multipart/mixed; boundary="{boundary}"{CRLF}'
           f"{CRLF}--{boundary}{CRLF}Content-Type: text/plain; charset=\"iso-2022-jp\"{CRLF}"
           f"Content-Transfer-Encoding: 7bit{CRLF}{CRLF}").encode() + body
    raw += (f"{CRLF}--{boundary}{CRLF}Content-Type: {content_type}; name=\"{word}\"{CRLF}"
            f"Content-Description: {word}{CRLF}"
            f"Content-Disposition: attachment; filename=\"{word}\"; size={len(data)}{CRLF}"
            f"Content-Transfer-Encoding: base64{CRLF}{CRLF}{b64(data)}{CRLF}"
            f"--{boundary}--{CRLF}").encode()
    return raw


def thunderbird_rfc2231(name: str, data: bytes, content_type: str = "text/csv") -> bytes:
    """Thunderbird: RFC 2231 continuations (`filename*0*=UTF-8''…; filename*1*=…`)."""
    quoted = urllib.parse.quote(name)
    half = len(quoted) // 2
    while "%" in quoted[half - 2 : half]:  # do not split a %XX escape
        half += 1
    dispo = (f"attachment;{CRLF} filename*0*=UTF-8''{quoted[:half]};{CRLF}"
             f" filename*1*={quoted[half:]}")
    return mixed("see attached", [part(data, f"{content_type}; charset=UTF-8", dispo)])


def swaks_shift_jis(name: str, data: bytes) -> bytes:
    """`swaks --attach-name` with a Shift_JIS name: raw 8-bit bytes in the header."""
    stand_in = name.encode("cp932").decode("latin-1")  # one char per raw byte
    raw = mixed("swaks attach", [part(data, f'application/octet-stream; name="{stand_in}"',
                                      f'attachment; filename="{stand_in}"')])
    return raw.decode("utf-8").encode("latin-1")


def content_type_name_only(name: str, data: bytes, content_type: str = "application/pdf") -> bytes:
    """Only `Content-Type; name=`, no Content-Disposition (old webmail and scanners)."""
    return mixed("scan", [part(data, f'{content_type}; name="{name}"')])


def html_inline_image_and_xlsx(html: str, image: bytes, xlsx_name: str, xlsx: bytes) -> bytes:
    """multipart/mixed[ multipart/related[ multipart/alternative[text, html], image ], xlsx ]."""
    alt, rel, mix = "alt-b", "rel-b", "mix-b"
    alternative = (f"Content-Type: multipart/alternative; boundary=\"{alt}\"{CRLF}{CRLF}"
                   f"--{alt}{CRLF}{part(b'see the table', 'text/plain; charset=utf-8')}"
                   f"--{alt}{CRLF}{part(html.encode(), 'text/html; charset=utf-8')}--{alt}--{CRLF}")
    image_part = (f"Content-ID: <logo@corp>{CRLF}" + part(image, "image/png", "inline"))
    related = (f"Content-Type: multipart/related; boundary=\"{rel}\"{CRLF}{CRLF}"
               f"--{rel}{CRLF}{alternative}--{rel}{CRLF}{image_part}--{rel}--{CRLF}")
    xlsx_part = attachment(xlsx_name, xlsx, XLSX_TYPE)
    return (headers() + f"Content-Type: multipart/mixed; boundary=\"{mix}\"{CRLF}{CRLF}"
            f"--{mix}{CRLF}{related}--{mix}{CRLF}{xlsx_part}--{mix}--{CRLF}").encode()


def forwarded(inner: bytes, note: str = "FYI, forwarding") -> bytes:
    """A message forwarded as an attachment: a message/rfc822 part carrying a file."""
    boundary = "fwd-b"
    return (headers("Fwd: test") + f"Content-Type: multipart/mixed; boundary=\"{boundary}\""
            f"{CRLF}{CRLF}--{boundary}{CRLF}Content-Type: text/plain; charset=utf-8{CRLF}{CRLF}"
            f"{note}{CRLF}--{boundary}{CRLF}Content-Type: message/rfc822{CRLF}"
            f"Content-Disposition: attachment; filename=\"forwarded.eml\"{CRLF}{CRLF}"
            ).encode() + inner + f"{CRLF}--{boundary}--{CRLF}".encode()


# Files ---------------------------------------------------------------------------

def ooxml(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def xlsx(cells: list[str]) -> bytes:
    items = "".join(f"<si><t>{c}</t></si>" for c in cells)
    return ooxml({
        "xl/workbook.xml": "<workbook/>",
        "xl/sharedStrings.xml": f'<sst count="{len(cells)}">{items}</sst>',
        "xl/worksheets/sheet1.xml": "<worksheet><sheetData/></worksheet>",
    })


def docx(paragraphs: list[str]) -> bytes:
    # Word splits text into runs; split each paragraph in two to prove runs are joined.
    body = "".join(
        f"<w:p><w:r><w:t>{p[: len(p) // 2]}</w:t></w:r>"
        f"<w:r><w:t>{p[len(p) // 2 :]}</w:t></w:r></w:p>"
        for p in paragraphs
    )
    return ooxml({"word/document.xml": f"<w:document><w:body>{body}</w:body></w:document>"})


def pptx(texts: list[str]) -> bytes:
    runs = "".join(f"<a:p><a:r><a:t>{t}</a:t></a:r></a:p>" for t in texts)
    slide = f"<p:sld>{runs}</p:sld>"
    return ooxml({"ppt/presentation.xml": "<p/>", "ppt/slides/slide1.xml": slide})


class _Cp932Name(zipfile.ZipInfo):
    """What Windows Explorer writes: CP932 name bytes, UTF-8 flag (bit 11) unset."""

    def _encodeFilenameFlags(self) -> tuple[bytes, int]:
        return self.filename.encode("cp932"), self.flag_bits & ~0x800


def plain_zip(entries: dict[str, bytes], cp932_names: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            info = _Cp932Name(name) if cp932_names else zipfile.ZipInfo(name)
            archive.writestr(info, data)
    return buffer.getvalue()


def encrypted_zip(entries: dict[str, bytes], password: bytes = b"secret") -> bytes:
    buffer = io.BytesIO()
    with pyzipper.AESZipFile(buffer, "w", encryption=pyzipper.WZ_AES) as archive:
        archive.setpassword(password)
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def pdf(encrypted: bool = False) -> bytes:
    encrypt = b" /Encrypt 5 0 R" if encrypted else b""
    trailer = b"trailer\n<< /Root 1 0 R" + encrypt + b" >>\n"
    return b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" + trailer + b"%%EOF\n"


PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
