"""Real-shaped messages, written out byte for byte as the clients send them."""

from __future__ import annotations

import base64
import io
import random
import zipfile

import pyzipper

CRLF = "\r\n"


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode("ascii").replace("\n", CRLF)


def iso2022jp_word(text: str) -> str:
    """RFC 2047 ISO-2022-JP encoded-word, as Outlook writes filenames (inside quotes)."""
    return "=?iso-2022-jp?B?" + base64.b64encode(text.encode("iso-2022-jp")).decode() + "?="


def xlsx_bytes() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in [("[Content_Types].xml", "<Types/>"), ("xl/workbook.xml", "<b/>")]:
            z.writestr(zipfile.ZipInfo(name, (2025, 1, 1, 0, 0, 0)), text * 200)
    return out.getvalue()


PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n" + b"0" * 3000 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + random.Random(5).randbytes(2000)
CSV = "氏名,電話\n山田,03-0000-0000\n".encode() * 400


def encrypted_zip(password: str = "other") -> bytes:
    out = io.BytesIO()
    with pyzipper.AESZipFile(out, "w", encryption=pyzipper.WZ_AES) as z:
        z.setpassword(password.encode())
        z.writestr("secret.txt", b"secret")
    return out.getvalue()


ENCRYPTED_PDF = (
    b"%PDF-1.6\n1 0 obj << >> endobj\ntrailer\n<< /Root 1 0 R /Encrypt 5 0 R >>\n%%EOF\n"
)

TEXT_PLAIN = CRLF.join([
    'Content-Type: text/plain; charset="iso-2022-jp"',
    "Content-Transfer-Encoding: 7bit",
    "",
    "\x1b$B$*@$OC$K$J$C$F$*$j$^$9!#\x1b(B",
    "",
])
TEXT_HTML = CRLF.join([
    'Content-Type: text/html; charset="iso-2022-jp"',
    "Content-Transfer-Encoding: quoted-printable",
    "",
    '<html><body><p>=1B$B8+@Q=3Dq=1B(B</p><img src=3D"cid:image001.png@01DA0000.0=',
    'A1B2C3D">',
    "</body></html>",
    "",
])
INLINE_IMAGE = CRLF.join([
    "Content-Type: image/png",
    "Content-Transfer-Encoding: base64",
    "Content-ID: <image001.png@01DA0000.0A1B2C3D>",
    "",
    b64(PNG),
])
XLSX_NAME = "見積書_アクメ.xlsx"
PDF_NAME = "請求書.pdf"


def outlook_message() -> bytes:
    """Outlook: ISO-2022-JP headers, RFC 2047 names inside quotes, HTML with a cid image."""
    xlsx_word, pdf_word = iso2022jp_word(XLSX_NAME), iso2022jp_word(PDF_NAME)
    lines = [
        "From: =?iso-2022-jp?B?GyRCOzNFRBsoQg==?= <yamada@example.co.jp>",
        "To: client@acme.example",
        "Subject: =?iso-2022-jp?B?GyRCOCtAUTFxGyhC?=",
        "Message-ID: <0001@example.co.jp>",
        "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="_004_MIXED_"',
        "",
        "--_004_MIXED_",
        'Content-Type: multipart/related; boundary="_003_REL_"; type="multipart/alternative"',
        "",
        "--_003_REL_",
        'Content-Type: multipart/alternative; boundary="_000_ALT_"',
        "",
        "--_000_ALT_",
        TEXT_PLAIN,
        "--_000_ALT_",
        TEXT_HTML,
        "--_000_ALT_--",
        "",
        "--_003_REL_",
        INLINE_IMAGE,
        "--_003_REL_--",
        "",
        "--_004_MIXED_",
        "Content-Type: application/vnd.openxmlformats-officedocument.spreadsheetml.sheet;",
        f'\tname="{xlsx_word}"',
        f'Content-Description: {xlsx_word}',
        f'Content-Disposition: attachment;\tfilename="{xlsx_word}"; size=1234;',
        "Content-Transfer-Encoding: base64",
        "",
        b64(xlsx_bytes()),
        "--_004_MIXED_",
        f'Content-Type: application/pdf; name="{pdf_word}"',
        f'Content-Disposition: attachment; filename="{pdf_word}"',
        "Content-Transfer-Encoding: base64",
        "",
        b64(PDF),
        "--_004_MIXED_--",
        "",
    ]
    return CRLF.join(lines).encode("ascii")


def mixed(*parts: str, headers: tuple[str, ...] = (), boundary: str = "BOUNDARY") -> bytes:
    """multipart/mixed with a plain text body and the given parts, written by hand."""
    lines = [
        "From: sender@example.co.jp",
        "To: client@acme.example",
        "Subject: test",
        *headers,
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        "本文です。",
        "",
    ]
    for part in parts:
        lines += [f"--{boundary}", part]
    lines += [f"--{boundary}--", ""]
    return CRLF.join(lines).encode("utf-8")


def part(headers: list[str], data: bytes) -> str:
    return CRLF.join([*headers, "Content-Transfer-Encoding: base64", "", b64(data)])


def forwarded(inner: bytes, *, as_attachment: bool) -> str:
    disposition = ['Content-Disposition: attachment; filename="fwd.eml"'] if as_attachment else []
    return CRLF.join(["Content-Type: message/rfc822", *disposition, "", inner.decode()])
