"""One mail transaction on an open aiosmtplib connection, pipelined (RFC 2920).

aiosmtplib's `SMTP.sendmail` waits for a reply after MAIL, after each RCPT and after
DATA (a write and a wake-up each), and copies the message three times (line ends,
dot-stuffing, the final dot) before writing it in one piece. For a server that offers
PIPELINING, `sendmail` here writes MAIL, every RCPT and DATA at once and reads their
replies in order; the body is dot-stuffed a window at a time and written with flow
control, so no second whole copy of it is ever built.

aiosmtplib keeps the connection: connecting, STARTTLS, AUTH and EHLO are its own. Its
`read_response` cannot read replies to pipelined commands (it parses one reply per
`data_received` and drops what arrives while no read is pending), so for the length
of one transaction `_Exchange` takes the transport's incoming side and hands it back
after, or closes the connection when the two sides may no longer be in step.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import cast

import aiosmtplib
from aiosmtplib import (
    SMTPDataError,
    SMTPException,
    SMTPNotSupported,
    SMTPReadTimeoutError,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPStatus,
    SMTPTimeoutError,
)
from aiosmtplib.email import quote_address

from gateway.intake import normalize_newlines
from gateway.smtp_in import PLAIN_ADDRESS

# The body goes out this much at a time; the transport holds at most about this much
# more while the server catches up.
WINDOW = 256 * 1024
# aiosmtplib's limits on what the server may send back.
_LINE_LIMIT = 8192
_REPLY_LIMIT = _LINE_LIMIT * 4
_INVALID = SMTPStatus.invalid_response.value
# As aiosmtplib's execute_command: no control character inside a command line.
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_RCPT_OK = (SMTPStatus.completed, SMTPStatus.will_forward)
# A dot-atom address (RFC 5321's plain form, as intake's fast path reads it), which
# aiosmtplib's quote_address (email.utils.parseaddr, ~35 µs an address) hands back
# unchanged between angle brackets.
_PLAIN_ADDRESS = re.compile(PLAIN_ADDRESS)

Refused = dict[str, SMTPResponse]


async def sendmail(
    client: aiosmtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    message: bytes | bytearray,
    *,
    mail_options: Sequence[str] = (),
) -> tuple[Refused, str]:
    """`client.sendmail(sender, recipients, message, mail_options=...)` for a server
    that offers PIPELINING: the same return value (the refused recipients, the text of
    the final reply) and the same exceptions."""
    encoding = "utf-8" if any(o.lower() == "smtputf8" for o in mail_options) else "ascii"
    if encoding == "utf-8" and not client.supports_extension("smtputf8"):
        raise SMTPNotSupported("SMTPUTF8 is not supported by this server")
    options = list(mail_options)
    if client.supports_extension("size"):
        # RFC 1870: the octets as the DATA section carries them, before dot-stuffing
        # (exact for what intake stored, whose line ends are already CRLF).
        size = len(message) if message.endswith(b"\r\n") else len(message) + 2
        options.insert(0, f"SIZE={size}")
    envelope = _envelope(sender, recipients, options, encoding)
    async with _exchange(client) as exchange:
        refused, final = await _transact(
            exchange, sender, envelope, recipients, message, client.timeout
        )
    if final is None:
        raise SMTPRecipientsRefused(refused)
    if final.code != SMTPStatus.completed:
        raise SMTPDataError(final.code, final.message)
    return {r.recipient: SMTPResponse(r.code, r.message) for r in refused}, final.message


def _envelope(sender: str, recipients: Sequence[str], options: list[str], encoding: str) -> bytes:
    """MAIL, one RCPT per recipient and DATA, as one write. DATA ends the group
    (RFC 2920 §3.1): the body may only follow its 354."""
    mail = b" ".join(
        [b"MAIL FROM:" + _quoted(sender).encode(encoding), *(o.encode() for o in options)]
    )
    lines = [mail, *(b"RCPT TO:" + _quoted(r).encode(encoding) for r in recipients)]
    for line in lines:
        if _CONTROL.search(line):
            raise ValueError("Command arg contains a prohibited control character")
    lines.append(b"DATA")
    return b"\r\n".join(lines) + b"\r\n"


def _quoted(address: str) -> str:
    """`<address>` exactly as aiosmtplib's `quote_address` writes it: a dot-atom
    address comes back unchanged, so it is spared email.utils.parseaddr."""
    if _PLAIN_ADDRESS.fullmatch(address):
        return f"<{address}>"
    return quote_address(address)


async def _transact(
    exchange: _Exchange,
    sender: str,
    envelope: bytes,
    recipients: Sequence[str],
    message: bytes | bytearray,
    timeout: float | None,
) -> tuple[list[SMTPRecipientRefused], SMTPResponse | None]:
    """The refused recipients, and the final reply (None: nobody was accepted)."""
    exchange.write(envelope)
    mail = await exchange.reply(timeout)
    if mail.code != SMTPStatus.completed:
        raise SMTPSenderRefused(mail.code, mail.message, sender)
    refused = []
    for recipient in recipients:
        reply = await exchange.reply(timeout)
        if reply.code == SMTPStatus.domain_unavailable:
            # 421: the server is closing the channel, as aiosmtplib takes it too.
            raise SMTPResponseException(reply.code, reply.message)
        if reply.code not in _RCPT_OK:
            refused.append(SMTPRecipientRefused(reply.code, reply.message, recipient))
    data = await exchange.reply(timeout)
    if len(refused) == len(recipients):
        await _abandon(exchange, data, timeout)
        return refused, None
    if data.code != SMTPStatus.start_input:
        raise SMTPDataError(data.code, data.message)
    for piece in dot_stuffed(message):
        exchange.write(piece)
        await exchange.drain(timeout)
    return refused, await exchange.reply(timeout)


async def _abandon(exchange: _Exchange, data: SMTPResponse, timeout: float | None) -> None:
    """No recipient was accepted, so DATA should have been refused; after a 354
    anyway, an empty message ends it (RFC 2920 §3.1). RSET then readies the connection
    for the next transaction; if that fails, it is not used again."""
    try:
        if data.code == SMTPStatus.start_input:
            exchange.write(b".\r\n")
            await exchange.reply(timeout)
        exchange.write(b"RSET\r\n")
        reset = await exchange.reply(timeout)
    except (SMTPException, OSError):
        reset = None
    if reset is None or reset.code != SMTPStatus.completed:
        exchange.abort()


def dot_stuffed(message: bytes | bytearray, window: int = WINDOW) -> Iterator[bytes]:
    """The DATA section in pieces of about `window` bytes: `message` with CRLF line
    ends, one more "." before each line that begins with one (RFC 5321 §4.5.2), then
    the end-of-data line. A message within one window is copied once, for the
    end-of-data line, unless it has such lines.

    Intake stores only CRLF line ends (gateway/intake.py) and the gateway's own mail is
    written with policy.SMTP; a bare CR or LF that still comes this way becomes CRLF
    here, as intake would make it (RFC 5321 §2.3.8), a window at a time."""
    size, start = len(message), 0
    while True:
        end = size if size - start <= window else _cut(message, start, window)
        # One copy of each window, as bytes whatever the message is (encryption's
        # output is a bytearray); a bytes message in one window is not copied at all.
        piece = (
            message
            if end - start == size and isinstance(message, bytes)
            else bytes(memoryview(message)[start:end])
        )
        piece = normalize_newlines(piece)  # the piece itself when its line ends are CRLF
        if piece[:1] == b"." and (start == 0 or message[start - 1] == 0x0A):
            piece = b"." + piece
        piece = piece.replace(b"\n.", b"\n..")
        if end == size:
            yield piece + (b".\r\n" if piece.endswith(b"\r\n") else b"\r\n.\r\n")
            return
        yield piece
        start = end


def _cut(message: bytes | bytearray, start: int, window: int) -> int:
    """Just after the last LF within the window. Within a longer line, at the window's
    end (a "." there begins no line), moved past a CR so that no piece but the last ends
    with one: a CRLF is never split, and only an LF ever ends the previous piece."""
    cut = message.rfind(b"\n", start, start + window) + 1
    if cut > start:
        return cut
    cut = start + window
    while cut < len(message) and message[cut - 1] == 0x0D:
        cut += 1
    return cut


@asynccontextmanager
async def _exchange(client: aiosmtplib.SMTP) -> AsyncIterator[_Exchange]:
    """The client's transport, read by an `_Exchange` until the block ends. A block
    that raises may leave replies unread: the connection is closed, never reused, and
    what it still had to send is dropped (a final dot sent after we gave up would
    deliver a message that we then send again)."""
    protocol = client.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise SMTPServerDisconnected("Server not connected")
    exchange = _Exchange(cast(asyncio.Transport, transport), protocol)
    transport.set_protocol(exchange)
    try:
        yield exchange
    except BaseException:
        exchange.abort()
        client.close()
        raise
    if exchange.in_step and not transport.is_closing():
        transport.set_protocol(protocol)
    else:
        client.close()


class _Exchange(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol on the transport during one transaction:
    keeps every reply that arrives, in order, and waits for the transport to drain.
    A lost connection is passed on to aiosmtplib's protocol, which closes its client."""

    def __init__(self, transport: asyncio.Transport, owner: asyncio.BaseProtocol) -> None:
        self._transport = transport
        self._owner = owner
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._replies: deque[SMTPResponse] = deque()
        self._error: SMTPException | None = None
        self._event: asyncio.Future[None] | None = None
        self._expired = False
        self._paused = False

    @property
    def in_step(self) -> bool:
        """Every reply read and nothing else sent: the next command's reply will be its own."""
        return self._error is None and not self._replies and not self._buffer

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if self._transport.is_closing():
            raise SMTPServerDisconnected("Connection lost")
        self._transport.write(data)

    async def reply(self, timeout: float | None) -> SMTPResponse:
        """The next reply, in the order the commands were written."""
        if not self._replies and not await self._until(self._has_reply, timeout):
            raise SMTPReadTimeoutError("Timed out waiting for server response")
        if self._replies:
            return self._replies.popleft()
        assert self._error is not None
        raise self._error

    async def drain(self, timeout: float | None) -> None:
        if self._paused and not await self._until(self._writable, timeout):
            raise SMTPTimeoutError("Timed out sending the message")
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._fail(SMTPServerDisconnected("Connection abandoned"))
        self._transport.abort()

    def _has_reply(self) -> bool:
        return bool(self._replies)

    def _writable(self) -> bool:
        return not self._paused

    async def _until(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until `ready()` or a failure; False if `timeout` seconds passed first.
        (A plain timer: asyncio.timeout costs several times as much per wait.)"""
        self._expired = False
        timer = None if timeout is None else self._loop.call_later(timeout, self._expire)
        try:
            while not ready() and self._error is None:
                if self._expired:
                    return False
                self._event = self._loop.create_future()
                await self._event
        finally:
            self._event = None
            if timer is not None:
                timer.cancel()
        return True

    def _expire(self) -> None:
        self._expired = True
        self._wake()

    def _wake(self) -> None:
        if self._event is not None and not self._event.done():
            self._event.set_result(None)

    def _fail(self, error: SMTPException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buffer += data
        try:
            self._parse()
        except SMTPResponseException as error:
            self._fail(error)
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("Unexpected EOF received"))
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(SMTPServerDisconnected("Connection lost"))
        self._owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def _parse(self) -> None:
        """Every complete reply in the buffer, read as aiosmtplib reads one (RFC 5321
        §4.2.1: "250-" continues, "250 " ends; the text's lines joined by LF)."""
        buffer, start, position = self._buffer, 0, 0
        text = bytearray()
        while (end := buffer.find(b"\n", position)) >= 0:
            line = bytes(buffer[position : end + 1])
            position = end + 1
            if len(line) > _LINE_LIMIT:
                raise SMTPResponseException(_INVALID, "Response too long")
            try:
                code = int(line[:3])
            except ValueError:
                shown = line.decode("utf-8", errors="ignore")
                raise SMTPResponseException(
                    _INVALID, f"Malformed SMTP response line: {shown}"
                ) from None
            if text:
                text += b"\n"
            text += line[4:].strip(b" \t\r\n")
            if line[3:4] != b"-":
                self._replies.append(SMTPResponse(code, text.decode("utf-8", "surrogateescape")))
                text = bytearray()
                start = position
        del buffer[:start]
        if len(buffer) > _REPLY_LIMIT:
            raise SMTPResponseException(_INVALID, "Response too long")


__all__ = ["WINDOW", "dot_stuffed", "sendmail"]
