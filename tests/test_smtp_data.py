"""DATA is read into one buffer (gateway.smtp_data), with aiosmtpd's rules kept: RFC 5321
§4.5.2 dot-unstuffing, only CRLF.CRLF ends the data, 500 for a long line and 552 past
the size limit, both after the end of data, and the session goes on."""

from __future__ import annotations

import asyncio
import socket
import tracemalloc
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.smtp_data import REPLY_TOO_LONG, REPLY_TOO_MUCH, Refused, read_data
from gateway.smtp_in import Counters, GatewaySMTP
from tests.conftest import Upstream, gateway_config, running
from tests.test_hostile_input import data_transaction, dialogue

LINE_LIMIT = SMTP.line_length_limit


def reader_with(*chunks: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    for chunk in chunks:
        reader.feed_data(chunk)
    return reader


async def read(reader: asyncio.StreamReader, size_limit: int | None = None) -> Any:
    return await read_data(reader, size_limit, LINE_LIMIT, lambda: True)


async def test_dot_stuffed_lines_lose_one_dot_and_only_a_lone_dot_ends_the_data() -> None:
    reader = reader_with(b"Subject: dots\r\n\r\n..\r\n...x\r\n.x\r\n x.\r\n.\r\nNOOP\r\n")
    content = await read(reader)
    assert content == b"Subject: dots\r\n\r\n.\r\n..x\r\nx\r\n x.\r\n"
    assert await reader.readline() == b"NOOP\r\n"  # what follows the end is left unread


async def test_bare_lf_and_cr_dot_sequences_do_not_end_the_data() -> None:
    # Smuggling: \n.\r\n, \r.\r\n, \n.\n ... are content; intake normalises them later.
    body = b"a\n.\r\nb\r.\r\nc\n.\nd\r\n.\n.\r.\r\n"
    content = await read(reader_with(body + b".\r\n"))
    assert content == b"a\n.\r\nb\r.\r\nc\n.\nd\r\n\n.\r.\r\n"


async def test_data_is_one_bytes_object_without_a_list_of_lines() -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz01\r\n"
    body = line * 40_000  # 3 MB in 40,000 lines
    reader = reader_with()
    tracemalloc.start()
    try:
        reading = asyncio.ensure_future(read(reader))
        for start in range(0, len(body), 65536):  # as a socket delivers it
            reader.feed_data(body[start : start + 65536])
            await asyncio.sleep(0)
        reader.feed_data(b".\r\n")
        content = await reading
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert type(content) is bytes and content == body
    # One object per line would cost more than the data itself (a bytes header is 33
    # bytes, a list slot 8, per 78-byte line); the buffer's growth costs 1/8.
    assert peak < 1.3 * len(body), peak


async def test_a_long_line_is_refused_once_its_pieces_end_even_if_a_piece_is_a_lone_dot() -> None:
    reader = reader_with(b"Subject: x\r\n\r\n", b"x" * 2000 + b".")
    task = asyncio.ensure_future(read(reader))
    await asyncio.sleep(0.01)
    reader.feed_data(b"\r\n")  # the long line ends with ".\r\n": not the end of data
    await asyncio.sleep(0.01)
    assert not task.done()
    reader.feed_data(b"after\r\n.\r\n")
    assert await task == Refused(REPLY_TOO_LONG)


async def test_a_line_just_over_the_limit_that_the_reader_passes_is_refused() -> None:
    # StreamReader lets a separator start at the limit: 1,003 bytes reach the check.
    content = await read(reader_with(b"x" * (LINE_LIMIT) + b"\r\n.\r\n"))
    assert content == Refused(REPLY_TOO_LONG)
    content = await read(reader_with(b"x" * (LINE_LIMIT - 2) + b"\r\n.\r\n"))
    assert content == b"x" * (LINE_LIMIT - 2) + b"\r\n"


async def test_data_past_the_size_limit_is_read_to_its_end_and_refused() -> None:
    reader = reader_with(b"0123456789\r\n" * 10, b".\r\nNOOP\r\n")
    assert await read(reader, size_limit=100) == Refused(REPLY_TOO_MUCH)
    assert await reader.readline() == b"NOOP\r\n"
    assert await read(reader_with(b"0123456789\r\n" * 8, b".\r\n"), size_limit=100) == (
        b"0123456789\r\n" * 8
    )


async def test_a_connection_that_goes_mid_data_gives_no_content() -> None:
    reader = reader_with(b"Subject: x\r\n\r\npartial\r\n")
    gone = iter([True, True, False])
    assert await read_data(reader, None, LINE_LIMIT, lambda: next(gone)) is None


async def test_dot_stuffing_round_trips_through_the_gateway_byte_for_byte(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    message = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\nend\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    config = gateway_config(tmp_path, sqlite_url, upstream.port)
    async with running(config) as gw, dialogue(gw.smtp_port) as d:
        assert (await d.command("EHLO client.test")).startswith("250")
        reply = await data_transaction(d, stuffed + b".\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        received = await upstream.wait_for(1)
    # Unstuffed here, stuffed again by the delivery client, unstuffed by the upstream.
    assert received[0].data == message


async def test_a_message_over_the_size_limit_gets_552_and_the_session_goes_on(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port, smtp={"max_message_size": "10KB"})
    async with running(config) as gw, dialogue(gw.smtp_port) as d:
        assert (await d.command("EHLO client.test")).startswith("250")
        big = b"Subject: big\r\n\r\n" + b"y" * 70 + b"\r\n"
        reply = await data_transaction(d, big * 200 + b".\r\n")
        assert reply.startswith("552"), reply
        reply = await data_transaction(d, b"Subject: small\r\n\r\nok\r\n.\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply
        received = await upstream.wait_for(1)
    assert [r.data for r in received] == [b"Subject: small\r\n\r\nok\r\n"]


def send_blocking(port: int, body: bytes) -> list[bytes]:
    """A plain socket client in a thread: it sends `body` without buffering a copy."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220")
        for command in (
            b"HELO client.test",
            b"MAIL FROM:<a@example.com>",
            b"RCPT TO:<b@client.example>",
            b"DATA",
        ):
            sock.sendall(command + b"\r\n")
            replies.readline()
        sock.sendall(body)
        return [replies.readline()]


async def test_the_gateway_hands_its_handler_the_data_as_read_in_one_buffer() -> None:
    seen: list[bytes] = []

    class Keep:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            assert envelope.content is envelope.original_content
            assert isinstance(envelope.original_content, bytes)
            seen.append(envelope.original_content)
            return "250 kept"

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: GatewaySMTP(Keep(), Counters(), 10, 10, hostname="gw.test"),  # type: ignore[arg-type]
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    line = b"..0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
    body = b"Subject: big\r\n\r\n" + line * 40_000  # 3 MB, every line dot-stuffed
    sent = body + b".\r\n"
    tracemalloc.start()
    try:
        replies = await asyncio.to_thread(send_blocking, port, sent)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        server.close()
        await server.wait_closed()
    assert replies == [b"250 kept\r\n"]
    assert seen == [body.replace(b"\n..", b"\n.")]
    # aiosmtpd's own DATA keeps a bytearray per line and joins them: over 3x the data.
    assert peak < 1.5 * len(body), peak


def test_data_keeps_its_help_text() -> None:
    """The DATA override keeps aiosmtpd's HELP line (without it, `HELP DATA` is a 501
    that counts against the session's error budget, and HELP does not list DATA)."""
    assert getattr(GatewaySMTP.smtp_DATA, "__smtp_syntax__", None) == "DATA"
    assert GatewaySMTP.smtp_DATA.__smtp_syntax__ == SMTP.smtp_DATA.__smtp_syntax__  # type: ignore[attr-defined]
