"""Reading the DATA section into one buffer.

aiosmtpd keeps every line of DATA as its own bytearray in a list and joins them at
the end: a 50 MB message of 78-byte lines costs ~100 MB of line objects plus the
50 MB join. Here each line is written, dot-unstuffed, into one `io.BytesIO`, whose
`getvalue()` hands over its buffer without a copy when nothing else shares it.

Every rule of aiosmtpd 1.4.6's `smtp_DATA` is kept: only CRLF.CRLF ends the data (RFC
5321 §4.1.1.4; bare CR and LF stay in the content for intake to normalise or refuse),
a line longer than the limit answers 500 and one past the size limit 552, and both
only after the end of data has been read (RFC 5321 §4.2.5), with nothing kept of
the refused data meanwhile.
"""

from __future__ import annotations

import asyncio
import enum
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

END_OF_DATA = b".\r\n"
REPLY_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"
REPLY_TOO_MUCH = "552 Error: Too much mail data"


class _State(enum.Enum):
    NOMINAL = enum.auto()
    TOO_LONG = enum.auto()
    TOO_MUCH = enum.auto()


@dataclass(frozen=True, slots=True)
class Refused:
    """The data was read to its end but not kept; `reply` says why."""

    reply: str


class _Collector:
    """The state of one DATA section, fed one line (or piece of a long line) at a time."""

    def __init__(self, size_limit: int | None, line_limit: int) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.buffer = io.BytesIO()
        self.size = 0
        self.state = _State.NOMINAL
        # Inside a line longer than the reader's limit, read in pieces. Such a line is
        # refused whole, so its pieces are never kept; a piece that is ".\r\n" is its end,
        # not the end of data.
        self.mid_line = False

    def too_long(self) -> None:
        if self.state is _State.NOMINAL:
            self.state = _State.TOO_LONG
        self._discard()

    def _discard(self) -> None:
        # Nothing of refused data is kept while the rest of it is read.
        self.buffer = io.BytesIO()

    def add(self, line: bytes) -> None:
        self.size += len(line)
        if self.state is _State.NOMINAL and self.size_limit and self.size > self.size_limit:
            self.state = _State.TOO_MUCH
            self._discard()
        complete = line.endswith(b"\r\n")
        was_mid_line, self.mid_line = self.mid_line, not complete
        if was_mid_line or not complete or self.state is not _State.NOMINAL:
            return
        if len(line) > self.line_limit:
            self.too_long()
            return
        # RFC 5321 §4.5.2: a line that starts with a dot had one more dot added.
        self.buffer.write(memoryview(line)[1:] if line[:1] == b"." else line)

    def result(self) -> bytes | Refused:
        match self.state:
            case _State.NOMINAL:
                return self.buffer.getvalue()
            case _State.TOO_LONG:
                return Refused(REPLY_TOO_LONG)
            case _State.TOO_MUCH:
                return Refused(REPLY_TOO_MUCH)
            case unreachable:
                assert_never(unreachable)


async def read_data(
    reader: asyncio.StreamReader,
    size_limit: int | None,
    line_limit: int,
    connected: Callable[[], bool],
) -> bytes | Refused | None:
    """The content up to the end-of-data line, a refusal, or None if the connection went.

    The reader's own limit must be the line limit: a longer line raises
    `LimitOverrunError`, and is then drained in pieces.
    """
    data = _Collector(size_limit, line_limit)
    while connected():
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as error:
            data.too_long()
            line = await reader.read(error.consumed)
        if not data.mid_line and line == END_OF_DATA:
            return data.result()
        data.add(line)
    return None


__all__ = ["Refused", "read_data"]
