"""Large attachments are protected without holding the decoded file, its ZIP and its
base64 all at once: decoded a window at a time into the ZIP writer, the ZIP spooled to
a temporary file, the output written once. Each step must give exactly what the whole
one gave."""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
import tracemalloc

import pytest
import pyzipper
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.mime import parse, walk_attachments
from policies.transforms import encrypt
from policies.transforms.encrypt import ZipMethod, encrypt_attachments

DATE = (2025, 4, 1, 9, 30, 0)
PASSWORD = "Hk4pXr7tWm2qZs9v"


def _wrapped(data: bytes, width: int, nl: bytes, noise: bytes) -> bytes:
    encoded = base64.b64encode(data)
    if width == 0:
        return noise + encoded + noise
    lines = [encoded[i : i + width] for i in range(0, len(encoded), width)]
    return noise + (nl + noise).join(lines) + nl


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=3000),
    width=st.sampled_from([0, 1, 3, 4, 60, 76, 77]),
    nl=st.sampled_from([b"\r\n", b"\n"]),
    noise=st.sampled_from([b"", b" ", b"\t \r\n"]),
    window=st.integers(min_value=1, max_value=300),
    probe=st.integers(min_value=1, max_value=500),
)
def test_base64_decoded_a_window_at_a_time_is_the_whole_decode(
    data: bytes, width: int, nl: bytes, noise: bytes, window: int, probe: int
) -> None:
    raw = b"head" + _wrapped(data, width, nl, noise) + b"tail"
    start, end = 4, len(raw) - 4
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encrypt, "_WINDOW", window)
        patch.setattr(encrypt, "_PROBE", probe)
        size = encrypt._decoded_size(raw, start, end)
        pieces = list(encrypt._decoded(raw, start, end))
    assert binascii.a2b_base64(raw[start:end]) == data  # what the whole decode gives
    assert size == len(data)
    assert b"".join(pieces) == data
    assert not pieces or len(pieces[0]) >= min(probe, len(data))


@pytest.mark.parametrize(
    "text",
    [b"QQ==QQ==", b"QQ=\r\n=QQ==", b"Q===", b"QUJD\r\nRA", b"QUJD=A=="],
)
def test_base64_the_windows_cannot_vouch_for_is_left_to_the_whole_decode(text: bytes) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encrypt, "_WINDOW", 3)
        assert encrypt._decoded_size(text, 0, len(text)) is None


@pytest.mark.parametrize("numpy", [True, False])
@pytest.mark.parametrize("nl", [b"\r\n", b"\n"])
@pytest.mark.parametrize("size", [1, 56, 57, 58, 4 * 57 - 1, 4 * 57, 4 * 57 + 1, 1000])
def test_a_zip_encoded_into_the_output_is_what_encodebytes_makes(
    monkeypatch: pytest.MonkeyPatch, numpy: bool, nl: bytes, size: int
) -> None:
    monkeypatch.setattr(encrypt, "_LINES_AT_ONCE", 4)  # several chunks, some partial
    if not numpy:
        monkeypatch.setattr(encrypt, "numpy_or_none", lambda: None)
    data = os.urandom(size)
    archive = encrypt.tempfile.SpooledTemporaryFile()
    archive.write(data)
    encoded = encrypt._Encoded(archive, nl)
    out = bytearray(b"<" + b"?" * len(encoded) + b">")
    assert encoded.write_into(out, 1) == len(out) - 1
    assert bytes(out) == b"<" + base64.encodebytes(data).replace(b"\n", nl) + b">"
    assert archive.closed


def _message(files: dict[str, bytes]) -> bytes:
    parts = [
        b"From: a@example.com\r\nTo: b@client.example\r\nSubject: files\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nThe files.\r\n"
    ]
    for name, data in files.items():
        encoded = base64.encodebytes(data).replace(b"\n", b"\r\n")
        parts.append(
            f"--b\r\nContent-Type: application/octet-stream\r\nContent-Disposition: "
            f'attachment; filename="{name}"\r\nContent-Transfer-Encoding: base64\r\n\r\n'.encode()
            + encoded
        )
    parts.append(b"--b--\r\n")
    return b"".join(parts)


def test_a_large_attachment_streams_into_a_zip_that_opens_as_writestr_made_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Windows, spool and encoding chunks scaled down with the message (a few MB here,
    # where the gateway's are a megabyte for messages of tens of MB).
    monkeypatch.setattr(encrypt, "_WINDOW", 128 << 10)
    monkeypatch.setattr(encrypt, "SPOOL", 128 << 10)
    monkeypatch.setattr(encrypt, "_LINES_AT_ONCE", 1024)
    files = {
        "random.bin": os.urandom(3 << 20),  # over the window and the spool: a temp file
        "report.txt": b"quarterly figures\n" * 20000,
        "tiny.txt": b"hi",
    }
    raw = _message(files)
    # Once small first: imports on first use (numpy, the AES code) are not the message's.
    encrypt_attachments(
        _message({"warm.bin": os.urandom(300_000)}),
        password=PASSWORD,
        method=ZipMethod.AES256,
        date_time=DATE,
    )
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = encrypt_attachments(
            raw, password=PASSWORD, method=ZipMethod.AES256, date_time=DATE
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result.data, bytearray) and result.files == 3
    # The output and a few windows. Decoded file, ZIP, base64 and output alive at once
    # took 2.5x the message (tracemalloc, as here).
    assert peak < 1.4 * len(raw), f"peak {peak / len(raw):.2f}x the message"
    opened = {}
    for found in walk_attachments(parse(result.data)):
        payload = found.part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        with pyzipper.AESZipFile(io.BytesIO(payload)) as archive:
            archive.setpassword(PASSWORD.encode())
            (info,) = archive.infolist()
            opened[info.filename] = (archive.read(info), info)
    assert {name: data for name, (data, _) in opened.items()} == files
    assert opened["random.bin"][1].compress_type == pyzipper.ZIP_STORED  # first window's probe
    assert opened["report.txt"][1].compress_type == pyzipper.ZIP_DEFLATED
    # Entry by entry as writestr, which knows the size first, writes it (AES version,
    # CRC, sizes).
    for name, data in files.items():
        reference = io.BytesIO()
        with pyzipper.AESZipFile(reference, "w", encryption=pyzipper.WZ_AES) as archive:
            archive.setpassword(PASSWORD.encode())
            archive.writestr(name, data, compress_type=opened[name][1].compress_type)
        with pyzipper.AESZipFile(reference) as archive:
            (written,) = archive.infolist()
        info = opened[name][1]
        assert (info.CRC, info.wz_aes_version, info.file_size) == (
            written.CRC,
            written.wz_aes_version,
            written.file_size,
        )


def test_zips_already_made_are_closed_when_a_later_attachment_needs_the_full_parse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[tempfile.SpooledTemporaryFile[bytes]] = []

    class Tracked(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    monkeypatch.setattr(encrypt.tempfile, "SpooledTemporaryFile", Tracked)
    monkeypatch.setattr(encrypt, "SPOOL", 64 << 10)
    good = os.urandom(300_000)
    raw = _message({"good.bin": good, "bad.bin": b"x"})
    # bad.bin's base64 is cut short (2 characters of 4): only the email package's
    # lenient decode takes it, so the splice gives way after good.bin's ZIP is made.
    raw = raw.replace(base64.encodebytes(b"x").replace(b"\n", b"\r\n"), b"eA\r\n")
    result = encrypt_attachments(raw, password=PASSWORD, method=ZipMethod.AES256, date_time=DATE)
    assert result.files == 2 and isinstance(result.data, bytes)  # the full parse made it
    assert len(made) >= 3 and all(f.closed for f in made)
