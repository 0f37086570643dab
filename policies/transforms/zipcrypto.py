"""A ZIP writer with PKWARE traditional encryption ("ZipCrypto"), APPNOTE.TXT §6.1.

WEAKNESS: ZipCrypto is broken. A known-plaintext attack (Biham & Kocher, 1994;
`bkcrack` today) recovers the keys from about 12 bytes of known plaintext, and
stored entries of well-known formats (PNG/PDF headers, xlsx's `[Content_Types].xml`)
give an attacker exactly that. It is offered only because Windows Explorer and
Info-ZIP `unzip` cannot open WinZip AES archives; prefer `aes256` wherever the
recipient can open it.

What is written (APPNOTE.TXT 6.3.x):
- Each entry's CRC-32 is computed before writing, so the local header carries the
  real CRC and sizes and no data descriptor is used (general purpose bit 3 clear).
  The 12-byte encryption header therefore ends in the CRC's high byte (§6.1.6).
- Entries are stored (method 0) or deflated (method 8); names are UTF-8 with general
  purpose bit 11 set (APPNOTE 4.4.4, Appendix D), so Japanese names survive.
- ZIP64 is not written: an archive, entry or offset over 4 GiB - 1, or more than 65535
  entries, is refused with `ZipCryptoError`.

The 11 random bytes of each encryption header come from `random_bytes`, which the
caller supplies (default `os.urandom`, the only source of randomness here) so that
tests can be deterministic. Passwords are encoded as UTF-8; Windows Explorer reads
non-ASCII passwords in the OEM code page, so ASCII passwords are the portable choice.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from typing import IO

from policies.transforms import numpy_or_none

RandomBytes = Callable[[int], bytes]
VECTOR_MIN_SIZE = 4096  # below this the reference loop is as fast as the numpy kernel

_LIMIT = 0xFFFFFFFF  # without ZIP64 (APPNOTE 4.4.8/4.4.9), sizes and offsets are 32-bit
_MAX_ENTRIES = 0xFFFF
_FLAG_ENCRYPTED = 0x0001  # APPNOTE 4.4.4 bit 0
_FLAG_UTF8 = 0x0800  # APPNOTE 4.4.4 bit 11: name and comment are UTF-8
_VERSION = 20  # 2.0: deflate and traditional encryption (APPNOTE 4.4.3.2)
# Made by: Unix (APPNOTE 4.4.2). Info-ZIP `unzip` re-decodes names from hosts "MS-DOS"
# as OEM code page even when bit 11 is set, which garbles Japanese names.
_MADE_BY = 3 << 8 | _VERSION
_ATTRIBUTES = 0o100644 << 16  # regular file, rw-r--r--, in the Unix high half
_STORED, _DEFLATED = 0, 8
_CHUNK = 1 << 20

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_END = struct.Struct("<IHHHHIIH")


class ZipCryptoError(ValueError):
    """The archive cannot be written (too large for a non-ZIP64 archive, bad input)."""


def _crc_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


CRC_TABLE = _crc_table()
# decrypt_byte (§6.1.5) depends only on bits 2..15 of key2: temp*(temp^1) is the same
# product whether bit 0 is set or not, and bit 1 is forced on. 16384 entries.
KEYSTREAM = bytes(
    ((t * (t ^ 1)) >> 8) & 0xFF for t in (((i << 2) | 2) & 0xFFFF for i in range(1 << 14))
)

Keys = tuple[int, int, int]


def initial_keys(password: bytes) -> Keys:
    """§6.1.5: initialise the three keys with the password."""
    keys = (0x12345678, 0x23456789, 0x34567890)
    _, keys = encrypt_py(password, keys)
    return keys


def encrypt_py(data: bytes, keys: Keys) -> tuple[bytes, Keys]:
    """§6.1.6: encrypt `data`, updating the keys with each plaintext byte.

    The reference loop, kept as tight as CPython allows (about 1.5 MB/s).
    """
    k0, k1, k2 = keys
    table, stream = CRC_TABLE, KEYSTREAM
    out = bytearray(len(data))
    for i, p in enumerate(data):
        out[i] = p ^ stream[(k2 >> 2) & 0x3FFF]
        k0 = table[(k0 ^ p) & 0xFF] ^ (k0 >> 8)
        k1 = ((k1 + (k0 & 0xFF)) * 134775813 + 1) & 0xFFFFFFFF
        k2 = table[(k2 ^ (k1 >> 24)) & 0xFF] ^ (k2 >> 8)
    return bytes(out), (k0, k1, k2)


def encrypt(data: bytes, keys: Keys) -> tuple[bytes, Keys]:
    """Encrypt with the vectorised kernel when numpy is present, else the reference loop."""
    if len(data) >= VECTOR_MIN_SIZE and numpy_or_none() is not None:
        from policies.transforms import _zipcrypto_vector

        return _zipcrypto_vector.encrypt(data, keys, CRC_TABLE, KEYSTREAM)
    return encrypt_py(data, keys)


def dos_date_time(date_time: tuple[int, int, int, int, int, int]) -> tuple[int, int]:
    """APPNOTE 4.4.6: MS-DOS date and time; years before 1980 cannot be written."""
    year, month, day, hour, minute, second = date_time
    if not 1980 <= year <= 2107:
        raise ZipCryptoError("ZIP timestamps must fall between 1980 and 2107")
    return (year - 1980) << 9 | month << 5 | day, hour << 11 | minute << 5 | second // 2


class ZipCryptoWriter:
    """Writes a ZipCrypto-encrypted archive into a binary stream.

    Usage: `add()` each entry, then `close()` to write the central directory.
    """

    def __init__(
        self, out: IO[bytes], password: str, *, random_bytes: RandomBytes = os.urandom
    ) -> None:
        self._out = out
        self._keys = initial_keys(password.encode("utf-8"))  # the password is not kept
        self._random = random_bytes
        self._central: list[bytes] = []
        self._start = out.tell()
        self._closed = False

    def __repr__(self) -> str:
        return f"<ZipCryptoWriter entries={len(self._central)}>"

    def add(
        self, name: str, data: bytes, *, date_time: tuple[int, int, int, int, int, int],
        compress: bool,
    ) -> None:
        """Write one entry: CRC first, then deflate or store, then encrypt (§6.1.6)."""
        if self._closed:
            raise ZipCryptoError("archive already closed")
        if len(self._central) >= _MAX_ENTRIES:
            raise ZipCryptoError("more than 65535 entries needs ZIP64, which is not written")
        crc = zlib.crc32(data)
        payload = _deflate(data) if compress else data
        method = _DEFLATED if compress else _STORED
        name_bytes = name.encode("utf-8")
        sizes = (len(payload) + 12, len(data))
        offset = self._out.tell() - self._start
        if max(*sizes, offset) > _LIMIT or len(name_bytes) > 0xFFFF:
            raise ZipCryptoError("entry larger than 4 GiB needs ZIP64, which is not written")
        flags = _FLAG_ENCRYPTED | (_FLAG_UTF8 if not name.isascii() else 0)
        date, time = dos_date_time(date_time)
        fields = (_VERSION, flags, method, time, date, crc, *sizes, len(name_bytes))
        self._out.write(_LOCAL.pack(0x04034B50, *fields, 0) + name_bytes)
        self._write_encrypted(crc, payload)
        self._central.append(
            _CENTRAL.pack(0x02014B50, _MADE_BY, *fields, 0, 0, 0, 0, _ATTRIBUTES, offset)
            + name_bytes
        )

    def _write_encrypted(self, crc: int, payload: bytes) -> None:
        # §6.1.6: each entry restarts from the password keys; 11 random bytes, then
        # the CRC's high byte, which the reader checks to detect a wrong password.
        header = self._random(11)
        if len(header) != 11:
            raise ZipCryptoError("random_bytes returned the wrong length")
        encrypted, keys = encrypt(header + bytes([crc >> 24]), self._keys)
        self._out.write(encrypted)
        view = memoryview(payload)
        for start in range(0, len(payload), _CHUNK):
            encrypted, keys = encrypt(bytes(view[start : start + _CHUNK]), keys)
            self._out.write(encrypted)

    def close(self) -> None:
        """Write the central directory and the end record (APPNOTE 4.3.12, 4.3.16)."""
        if self._closed:
            return
        self._closed = True
        offset = self._out.tell() - self._start
        directory = b"".join(self._central)
        if offset + len(directory) > _LIMIT:
            raise ZipCryptoError("archive larger than 4 GiB needs ZIP64, which is not written")
        self._out.write(directory)
        count = len(self._central)
        self._out.write(_END.pack(0x06054B50, 0, 0, count, count, len(directory), offset, 0))


def _deflate(data: bytes) -> bytes:
    # Raw deflate (negative wbits): APPNOTE method 8 carries no zlib header.
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush()
