"""Attachments become password ZIPs that the recipients' tools open; the body does not move."""

from __future__ import annotations

import base64
import io
import os
import quopri
import random
import zipfile
from email.message import Message
from pathlib import Path

import pytest
import pyzipper

from policies.mime import SMTP_POLICY, filename_of, parse, walk_attachments
from policies.transforms import encrypt
from policies.transforms._ranges import Unsupported
from policies.transforms.encrypt import (
    EncryptError,
    ZipMethod,
    already_encrypted,
    encrypt_attachments,
    is_compressed,
    mime_name_params,
)

from . import samples
from .tools import extract_7z, extract_unzip, files_in, methods_7z

DATE = (2025, 4, 1, 9, 30, 0)
PASSWORD = "Hk4pXr7tWm2qZs9v"
ORIGINALS = {samples.XLSX_NAME: samples.xlsx_bytes(), samples.PDF_NAME: samples.PDF}


def _protect(
    raw: bytes, method: ZipMethod = ZipMethod.AES256, **kwargs: object
) -> tuple[bytes, dict[str, bytes]]:
    result = encrypt_attachments(
        raw,
        password=PASSWORD,
        method=method,
        date_time=DATE,
        **kwargs,  # type: ignore[arg-type]
    )
    zips = {a.filename or "": _decoded(a.part) for a in walk_attachments(parse(result.data))}
    return result.data, zips


def _decoded(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def _body_parts(raw: bytes) -> list[bytes]:
    """Each leaf part that is not an attachment, serialised as the parser saw it."""
    message = parse(raw)
    attachments = {id(a.part) for a in walk_attachments(message)}
    return [
        p.as_bytes(policy=SMTP_POLICY)
        for p in message.walk()
        if not p.is_multipart() and id(p) not in attachments
    ]


def test_outlook_message_attachments_zipped_body_parts_byte_identical() -> None:
    raw = samples.outlook_message()
    out, zips = _protect(raw)
    assert set(zips) == {f"{samples.XLSX_NAME}.zip", f"{samples.PDF_NAME}.zip"}
    bodies = _body_parts(raw)
    assert len(bodies) == 3  # text/plain, text/html and the cid image
    for body in bodies:
        assert body in raw  # the parser reproduces the part exactly...
        assert body in out  # ...and so it went out untouched
    assert samples.INLINE_IMAGE.encode() in out  # Content-ID and all
    header_end = raw.index(b"\r\n\r\n")
    assert out.startswith(raw[:header_end])  # top-level headers untouched, one added
    assert b"X-Sekisho-Protected: zip-aes256; files=2\r\n" in out[: out.index(b"\r\n\r\n") + 2]


def test_aes_zip_opens_with_pyzipper_and_keeps_japanese_names() -> None:
    _, zips = _protect(samples.outlook_message())
    for name, data in ORIGINALS.items():
        with pyzipper.AESZipFile(io.BytesIO(zips[f"{name}.zip"])) as archive:
            archive.setpassword(PASSWORD.encode())
            (info,) = archive.infolist()
            assert info.filename == name and info.flag_bits & 0x800
            assert archive.read(name) == data
            archive.setpassword(b"wrong-password")
            with pytest.raises(RuntimeError):
                archive.read(name)


@pytest.mark.parametrize(
    ("method", "extract"),
    [
        (ZipMethod.AES256, extract_7z),
        (ZipMethod.ZIPCRYPTO, extract_7z),
        (ZipMethod.ZIPCRYPTO, extract_unzip),
    ],
    ids=["aes256-7z", "zipcrypto-7z", "zipcrypto-unzip"],
)
def test_recipient_tool_extracts_originals_and_refuses_wrong_password(
    method: ZipMethod, extract: object, tmp_path: Path
) -> None:
    assert callable(extract)
    _, zips = _protect(samples.outlook_message(), method)
    for name, data in ORIGINALS.items():
        archive = tmp_path / "a.zip"
        archive.write_bytes(zips[f"{name}.zip"])
        assert extract(archive, PASSWORD, tmp_path / "ok").returncode == 0
        assert files_in(tmp_path / "ok")[name] == data
        assert extract(archive, "wrong-password", tmp_path / "bad").returncode != 0
        if (tmp_path / "bad").exists():  # 7z may leave a partial file; never the original
            assert files_in(tmp_path / "bad").get(name) != data


def test_compressed_types_stored_text_deflated(tmp_path: Path) -> None:
    raw = samples.mixed(
        samples.part(['Content-Type: text/csv; name="顧客.csv"'], samples.CSV),
        samples.part(['Content-Type: application/pdf; name="a.pdf"'], samples.PDF),
    )
    for method, stored, deflated in [
        (ZipMethod.ZIPCRYPTO, "ZipCrypto Store", "ZipCrypto Deflate"),
        (ZipMethod.AES256, "AES-256 Store", "AES-256 Deflate"),
    ]:
        _, zips = _protect(raw, method, mode="bundle")
        archive = tmp_path / f"{method}.zip"
        archive.write_bytes(zips["attachments.zip"])
        assert methods_7z(archive, PASSWORD) == {"顧客.csv": deflated, "a.pdf": stored}
    with zipfile.ZipFile(archive) as read:  # AES: the real method is in the AES extra
        assert {i.filename: i.compress_type for i in read.infolist()} == {
            "顧客.csv": 99,
            "a.pdf": 99,
        }


def test_name_only_in_content_type_is_protected() -> None:
    raw = samples.mixed(samples.part(['Content-Type: text/csv; name="list.csv"'], samples.CSV))
    result = encrypt_attachments(raw, password=PASSWORD, date_time=DATE)
    assert (result.files, result.zip_names) == (1, ("list.csv.zip",))
    assert samples.CSV not in result.data and b"text/csv" not in result.data


def test_inline_part_with_filename_is_protected() -> None:
    raw = samples.mixed(
        samples.part(
            ["Content-Type: image/png", 'Content-Disposition: inline; filename="scan.png"'],
            samples.PNG,
        )
    )
    result = encrypt_attachments(raw, password=PASSWORD, date_time=DATE)
    assert result.zip_names == ("scan.png.zip",)


def test_forwarded_message_attached_is_zipped_whole() -> None:
    inner = samples.mixed(
        samples.part(['Content-Type: text/csv; name="in.csv"'], samples.CSV), boundary="INNER"
    )
    raw = samples.mixed(samples.forwarded(inner, as_attachment=True))
    result = encrypt_attachments(raw, password=PASSWORD, date_time=DATE)
    assert (result.files, result.zip_names) == (1, ("fwd.eml.zip",))
    (zipped,) = walk_attachments(parse(result.data))
    with pyzipper.AESZipFile(io.BytesIO(_decoded(zipped.part))) as archive:
        archive.setpassword(PASSWORD.encode())
        assert archive.read("fwd.eml") == inner


def test_attachment_inside_inline_forwarded_message_is_protected_in_place() -> None:
    inner = samples.mixed(
        samples.part(['Content-Type: text/csv; name="in.csv"'], samples.CSV), boundary="INNER"
    )
    raw = samples.mixed(samples.forwarded(inner, as_attachment=False))
    result = encrypt_attachments(raw, password=PASSWORD, date_time=DATE)
    assert result.zip_names == ("in.csv.zip",)
    assert "本文です。".encode() in result.data and samples.CSV not in result.data


def test_already_encrypted_zip_and_pdf_left_alone_and_reported() -> None:
    locked_zip, locked_pdf = samples.encrypted_zip(), samples.ENCRYPTED_PDF
    raw = samples.mixed(
        samples.part(['Content-Type: application/zip; name="locked.zip"'], locked_zip),
        samples.part(['Content-Type: application/pdf; name="locked.pdf"'], locked_pdf),
        samples.part(['Content-Type: text/csv; name="open.csv"'], samples.CSV),
    )
    result = encrypt_attachments(raw, password=PASSWORD, date_time=DATE)
    assert result.skipped == ("locked.zip", "locked.pdf")
    assert (result.files, result.zip_names) == (1, ("open.csv.zip",))
    left = {a.filename: _decoded(a.part) for a in walk_attachments(parse(result.data))}
    assert left["locked.zip"] == locked_zip and left["locked.pdf"] == locked_pdf


def test_bundle_puts_every_attachment_in_one_zip(tmp_path: Path) -> None:
    raw = samples.outlook_message()
    result = encrypt_attachments(
        raw, password=PASSWORD, date_time=DATE, mode="bundle", method=ZipMethod.ZIPCRYPTO
    )
    assert (result.files, result.zip_names) == (2, ("attachments.zip",))
    (zipped,) = walk_attachments(parse(result.data))
    archive = tmp_path / "b.zip"
    archive.write_bytes(_decoded(zipped.part))
    assert extract_7z(archive, PASSWORD, tmp_path / "out").returncode == 0
    assert files_in(tmp_path / "out") == ORIGINALS
    for body in _body_parts(raw):
        assert body in result.data


def test_message_without_attachments_comes_back_identical() -> None:
    raw = samples.mixed()
    result = encrypt_attachments(raw, password=PASSWORD, date_time=DATE)
    assert result.data is raw and result.files == 0 and result.zip_names == ()


def test_header_can_be_turned_off_and_a_forged_one_is_replaced() -> None:
    raw = samples.mixed(
        samples.part(['Content-Type: text/csv; name="a.csv"'], samples.CSV),
        headers=("X-Sekisho-Protected: zip-aes256; files=9",),
    )
    off = encrypt_attachments(raw, password=PASSWORD, date_time=DATE, add_header=False)
    assert off.data.count(b"X-Sekisho-Protected") == 1  # the sender's, untouched
    on = encrypt_attachments(raw, password=PASSWORD, date_time=DATE, method=ZipMethod.ZIPCRYPTO)
    assert on.data.count(b"X-Sekisho-Protected") == 1
    assert b"X-Sekisho-Protected: zip-zipcrypto; files=1\r\n" in on.data


def test_zip_part_name_is_rfc2231_and_rfc2047() -> None:
    name = "見積書_アクメ株式会社向け_2025年度第一四半期_最終版.xlsx.zip"
    content_type, disposition = mime_name_params(name)
    assert "filename*0*=UTF-8''%E8%A6%8B" in disposition
    assert 'name="=?UTF-8?B?' in content_type
    lines = f"Content-Type: {content_type}\r\nContent-Disposition: {disposition}".split("\r\n")
    assert max(len(line) for line in lines) <= 78
    part = Message(policy=SMTP_POLICY)
    part.set_raw("Content-Type", content_type)
    assert filename_of(part) == name  # RFC 2047 alone, as old clients read it
    part.set_raw("Content-Disposition", disposition)
    assert filename_of(part) == name  # RFC 2231


def test_unsafe_names_lose_their_directories() -> None:
    raw = samples.mixed(
        samples.part(['Content-Type: text/plain; name="..\\\\..\\\\evil.txt"'], b"x" * 10)
    )
    assert encrypt_attachments(raw, password=PASSWORD, date_time=DATE).zip_names == (
        "evil.txt.zip",
    )


def test_password_is_never_in_errors() -> None:
    with pytest.raises(EncryptError) as empty:
        encrypt_attachments(samples.mixed(), password="", date_time=DATE)
    assert "password" in str(empty.value)
    raw = samples.mixed(samples.part(['Content-Type: text/csv; name="a.csv"'], samples.CSV))
    with pytest.raises(ValueError) as bad_date:
        encrypt_attachments(
            raw, password=PASSWORD, date_time=(1970, 1, 1, 0, 0, 0), method=ZipMethod.ZIPCRYPTO
        )
    assert PASSWORD not in str(bad_date.value) and PASSWORD not in repr(bad_date.value)


def test_too_many_parts_is_refused_not_sent_half_protected() -> None:
    parts = [samples.part(['Content-Type: text/csv; name="a.csv"'], b"a")] * 2100
    with pytest.raises(EncryptError, match="too complex"):
        encrypt_attachments(samples.mixed(*parts), password=PASSWORD, date_time=DATE)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (samples.PDF, True),
        (samples.PNG, True),
        (samples.xlsx_bytes(), True),
        (b"\xff\xd8\xff\xe0" + b"\0" * 100, True),
        (samples.CSV, False),
        (bytes(range(256)) * 400, False),
        (random.Random(9).randbytes(100_000), True),
        (b"short", False),
    ],
    ids=["pdf", "png", "xlsx", "jpeg", "csv", "repetitive", "random", "short"],
)
def test_is_compressed(data: bytes, expected: bool) -> None:
    assert is_compressed(data) is expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (samples.encrypted_zip(), True),
        (samples.ENCRYPTED_PDF, True),
        (samples.PDF, False),
        (samples.xlsx_bytes(), False),
        (b"PK\x03\x04broken", False),
    ],
    ids=["aes-zip", "pdf", "plain-pdf", "plain-zip", "broken-zip"],
)
def test_already_encrypted(data: bytes, expected: bool) -> None:
    assert already_encrypted(data) is expected


# The spliced path: ranges found in the raw bytes, every other byte copied.


def _full_parse_only(monkeypatch: pytest.MonkeyPatch, raw: bytes, **kwargs: object) -> bytes:
    """The transform's output through the full parse and re-serialisation."""
    with monkeypatch.context() as patch:
        patch.setattr(encrypt, "_spliced", _refuse)
        return _protect(raw, **kwargs)[0]  # type: ignore[arg-type]


def _refuse(*_: object) -> encrypt.EncryptResult:
    raise Unsupported("test: full parse only")


def _spliced(raw: bytes, mode: str = "per_file") -> bytes:
    """The spliced path alone: fails the test if it would fall back."""
    zipper = encrypt._Zipper(PASSWORD, ZipMethod.AES256, DATE, os.urandom)
    header = "zip-aes256; files={}"
    return encrypt._spliced(raw, zipper, mode, header, "attachments.zip").data  # type: ignore[arg-type]


def _qp(text: str) -> str:
    return quopri.encodestring(text.encode()).decode().replace("\n", "\r\n")


_NESTED = samples.mixed(
    "\r\n".join(
        [
            'Content-Type: multipart/mixed; boundary="NESTED"',
            "",
            "nested preamble",
            "--NESTED",
            samples.part(['Content-Type: text/csv; name="deep.csv"'], samples.CSV),
            "--NESTED",
            'Content-Type: text/plain; name="notes.txt"',
            "Content-Transfer-Encoding: quoted-printable",
            "",
            _qp("メモ: 電話 03-0000-0000 = 山田\n" * 30),
            "--NESTED--",
            "nested epilogue",
            "",
        ]
    ),
    samples.part(['Content-Type: application/pdf; name="a.pdf"'], samples.PDF),
)
_EIGHT_BIT = samples.mixed(
    "\r\n".join(
        [
            'Content-Type: text/csv; charset=utf-8; name="顧客.csv"',
            "Content-Transfer-Encoding: 8bit",
            "",
            "氏名,電話\r\n山田,03-0000-0000\r\n",
        ]
    ),
)
_PREAMBLE = (
    samples.mixed(
        samples.part(['Content-Type: text/csv; name="a.csv"'], samples.CSV),
    )
    .replace(b"\r\n\r\n--BOUNDARY\r\n", b"\r\n\r\nThis is a MIME message.\r\n\r\n--BOUNDARY\r\n", 1)
    .replace(b"--BOUNDARY--\r\n", b"--BOUNDARY--\r\nepilogue \xe6\x9c\xab\r\n")
)
_SPLICED = {
    "outlook": samples.outlook_message(),
    "nested-qp": _NESTED,
    "8bit": _EIGHT_BIT,
    "preamble-epilogue": _PREAMBLE,
    "lf-only": _NESTED.replace(b"\r\n", b"\n"),
    "forwarded": samples.mixed(
        samples.forwarded(
            samples.mixed(
                samples.part(['Content-Type: text/csv; name="in.csv"'], samples.CSV), boundary="IN"
            ),
            as_attachment=True,
        )
    ),
}


@pytest.mark.parametrize("mode", ["per_file", "bundle"])
@pytest.mark.parametrize("raw", _SPLICED.values(), ids=_SPLICED.keys())
def test_spliced_output_is_what_the_full_parse_makes(
    raw: bytes, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # AES salts are random: compare everything but the ZIP bytes, then the ZIP contents.
    fast, full = _spliced(raw, mode), _full_parse_only(monkeypatch, raw, mode=mode)
    assert _without_zips(fast) == _without_zips(full)
    assert _opened(fast) == _opened(full) != {}


def _without_zips(data: bytes) -> bytes:
    message = parse(data)
    for found in walk_attachments(message):
        if found.part.get_content_type() == "application/zip":
            found.part.set_payload("ZIP")
    return message.as_bytes(policy=SMTP_POLICY)


def _opened(data: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for found in walk_attachments(parse(data)):
        if found.part.get_content_type() == "application/zip":
            with pyzipper.AESZipFile(io.BytesIO(_decoded(found.part))) as archive:
                archive.setpassword(PASSWORD.encode())
                files |= {name: archive.read(name) for name in archive.namelist()}
    return files


def test_quoted_printable_and_8bit_attachments_are_zipped_decoded() -> None:
    assert _opened(_spliced(_NESTED)) == {
        "deep.csv": samples.CSV,
        "a.pdf": samples.PDF,
        "notes.txt": ("メモ: 電話 03-0000-0000 = 山田\n" * 30).replace("\n", "\r\n").encode(),
    }
    assert _opened(_spliced(_EIGHT_BIT)) == {
        "顧客.csv": "氏名,電話\r\n山田,03-0000-0000\r\n".encode()
    }


def test_every_byte_outside_the_attachments_is_kept() -> None:
    raw = _PREAMBLE
    out = _spliced(raw)
    start = raw.index(b'Content-Type: text/csv; name="a.csv"')
    end = raw.index(b"\r\n--BOUNDARY--")
    zip_start = out.index(b'Content-Type: application/zip; name="a.csv.zip"')
    zip_end = out.index(b"\r\n--BOUNDARY--")
    header_end = raw.index(b"\r\n\r\n") + 2
    added = b"X-Sekisho-Protected: zip-aes256; files=1\r\n"
    assert out[:zip_start] == raw[:header_end] + added + raw[header_end:start]
    assert out[zip_end:] == raw[end:]
    assert b"This is a MIME message." in out and b"epilogue \xe6\x9c\xab" in out


def test_line_ends_of_an_lf_message_are_kept() -> None:
    out = _spliced(_NESTED.replace(b"\r\n", b"\n"))
    assert b"\r" not in out
    assert set(_opened(out)) == {"deep.csv", "notes.txt", "a.pdf"}


@pytest.mark.parametrize("line_break", ["\r\n", "\r"], ids=["crlf", "bare-cr"])
def test_boundary_smuggled_inside_a_base64_body_still_ends_the_part(line_break: str) -> None:
    # The line sits inside a long base64 body, but the parser (and so the facts) reads a
    # new part there, also after a bare CR; the shortened skeleton must not hide it.
    hidden = samples.b64(samples.CSV * 4)
    body = samples.b64(random.Random(3).randbytes(20_000)).split("\r\n")
    smuggled = "\r\n".join(
        [
            *body[:99],
            body[99] + line_break + "--BOUNDARY",
            'Content-Type: text/csv; name="hidden.csv"',
            "Content-Transfer-Encoding: base64",
            "",
            hidden,
            *body[100:],
        ]
    )
    raw = samples.mixed(
        "\r\n".join(
            [
                'Content-Type: image/png; name="a.png"',
                "Content-Transfer-Encoding: base64",
                "",
                smuggled,
            ]
        )
    )
    assert "hidden.csv" in {a.filename for a in walk_attachments(parse(raw))}
    result = encrypt_attachments(raw, password=PASSWORD, date_time=DATE)
    assert "hidden.csv.zip" in result.zip_names
    assert hidden.split("\r\n")[0].encode() not in result.data
    if line_break == "\r":  # the scan splits lines at LF only: it must notice and give up
        with pytest.raises(Unsupported):
            _spliced(raw)
    else:
        assert b"hidden.csv.zip" in _spliced(raw)


@pytest.mark.parametrize(
    "raw",
    [
        samples.mixed(samples.part(['Content-Type: text/csv; name="a.csv"'], samples.CSV)).replace(
            "本文です。\r\n".encode(),  # a bare CR: the parser starts a line, and a part
            b'\r--BOUNDARY\r\nContent-Type: text/csv; name="b.csv"\r\n\r\nx,y\r\n',
        ),
        b'Content-Type: text/csv; name="a.csv"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        + samples.b64(samples.CSV).encode(),
    ],  # the message itself is the attachment
    ids=["bare-cr", "whole-message"],
)
def test_what_the_splice_cannot_vouch_for_goes_through_the_full_parse(raw: bytes) -> None:
    with pytest.raises(Unsupported):
        _spliced(raw)
    expected = {a.filename for a in walk_attachments(parse(raw))}
    result = encrypt_attachments(raw, password=PASSWORD, date_time=DATE)
    assert {n.removesuffix(".zip") for n in result.zip_names} == expected
    assert samples.b64(samples.CSV)[:76] not in str(result.data)


def test_base64_lines_are_those_of_encodebytes() -> None:
    for size in (0, 1, 56, 57, 58, 114, 10_000):
        data = random.Random(size).randbytes(size)
        expected = base64.encodebytes(data)
        for nl in (b"\n", b"\r\n"):
            archive = encrypt.tempfile.SpooledTemporaryFile()
            archive.write(data)
            encoded = encrypt._Encoded(archive, nl)
            out = bytearray(len(encoded))
            assert encoded.write_into(out, 0) == len(out)
            assert out == expected.replace(b"\n", nl)
