"""Sending upstream with PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write,
each recipient still answered by its own reply, the body dot-stuffed in one pass, and a
connection that broke never taken from the pool again.

Two real servers on loopback stand in for the smarthost: aiosmtpd (told to offer
PIPELINING), and `Scripted`, a small server whose replies each test decides and which
records what arrived in each read."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session
from aiosmtplib.email import quote_address
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import DeliveryConfig
from gateway.errors import PermanentFailure, TemporaryFailure
from gateway.intake import normalize_newlines
from gateway.smtp_out import _PLAIN_ADDRESS, _quoted, dot_stuffed
from gateway.transports import SmtpTransport
from tests.conftest import Upstream, UpstreamSMTP

MESSAGE = b"From: alice@example.com\r\nTo: bob@client.example\r\nSubject: figures\r\n\r\nbody\r\n"


@dataclass
class Scripted:
    """An SMTP server whose replies the test sets. The replies to what one read brought
    go out together once that read is handled, as Postfix's smtpd answers a pipelined
    group; with `withhold`, not before the group's DATA arrived, so a client that waits
    for each reply before its next command gets none."""

    pipelining: bool = True
    withhold: bool = False
    mail_reply: str = "250 2.1.0 Ok"
    rcpt_reply: Callable[[str], str] = lambda _address: "250 2.1.5 Ok"
    data_reply: str | None = None  # None: 354 if a recipient was accepted, else 554
    final_reply: str = "250 2.0.0 Ok: queued"
    drop_on: bytes | None = None  # close the first connection when this arrives, unanswered
    silent_on: bytes | None = None  # never answer this (nor anything after it)
    port: int = 0
    connections: int = 0
    reads: list[bytes] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    wire_bodies: list[bytes] = field(default_factory=list)  # DATA as sent: still stuffed

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = self.connections == 1
        writer.write(b"220 upstream.test ESMTP\r\n")
        pending, replies = bytearray(), bytearray()
        body: bytearray | None = None
        state = {"mail": False, "accepted": 0}
        silent = False
        while chunk := await reader.read(65536):
            self.reads.append(chunk)
            pending += chunk
            while (end := pending.find(b"\r\n")) >= 0:
                line = bytes(pending[: end + 2])
                del pending[: end + 2]
                if body is not None:
                    if first and self.drop_on == b"body":
                        writer.close()
                        return
                    if line == b".\r\n":
                        self.wire_bodies.append(bytes(body))
                        body = None
                        state = {"mail": False, "accepted": 0}
                        replies += self.final_reply.encode() + b"\r\n"
                    else:
                        body += line
                    continue
                self.commands.append(line)
                if first and self.drop_on and line.startswith(self.drop_on):
                    writer.close()
                    return
                if self.silent_on and line.startswith(self.silent_on):
                    silent = True
                reply = self._answer(line.rstrip(b"\r\n").decode(), state)
                if reply.startswith("354"):
                    body = bytearray()
                replies += reply.encode() + b"\r\n"
                if reply.startswith("221"):
                    writer.write(bytes(replies))
                    writer.close()
                    return
            held = self.withhold and state["mail"] and body is None and b"DATA" not in chunk
            if replies and not silent and not held:
                writer.write(bytes(replies))
                replies.clear()
        writer.close()

    def _answer(self, line: str, state: dict[str, int]) -> str:
        verb = line[:4].upper()
        if verb == "EHLO":
            offered = ["PIPELINING"] if self.pipelining else []
            lines = ["upstream.test", *offered, "SIZE 100000000", "8BITMIME", "SMTPUTF8"]
            return "\r\n".join(
                f"250{'-' if i < len(lines) - 1 else ' '}{t}" for i, t in enumerate(lines)
            )
        if verb == "MAIL":
            state["mail"] = self.mail_reply.startswith("250")
            return self.mail_reply
        if verb == "RCPT":
            if not state["mail"]:
                return "503 5.5.1 Error: need MAIL command"
            reply = self.rcpt_reply(re.findall(r"<(.*?)>", line)[0])
            state["accepted"] += reply.startswith("25")
            return reply
        if verb == "DATA":
            if self.data_reply is not None:
                return self.data_reply
            if not state["accepted"]:
                return "554 5.5.1 Error: no valid recipients"
            return "354 End data with <CR><LF>.<CR><LF>"
        if verb == "RSET":
            state.update(mail=False, accepted=0)
            return "250 2.0.0 Ok"
        if verb == "QUIT":
            return "221 2.0.0 Bye"
        return "502 5.5.2 Error: command not recognized"

    def envelope_reads(self) -> list[bytes]:
        return [r for r in self.reads if b"MAIL FROM" in r or b"RCPT TO" in r]


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    server = Scripted()
    listener = await asyncio.start_server(server.session, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    yield server
    listener.close()


@dataclass
class PipeliningUpstream(Upstream):
    """aiosmtpd reads one command at a time, so it serves a pipelined client as it is;
    it only has to say so."""

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


@pytest.fixture
async def aiosmtpd_upstream() -> AsyncIterator[PipeliningUpstream]:
    up = PipeliningUpstream()
    server = await asyncio.get_running_loop().create_server(
        lambda: UpstreamSMTP(up, hostname="upstream.test", decode_data=False, enable_SMTPUTF8=True),
        "127.0.0.1",
        0,
    )
    up.port = server.sockets[0].getsockname()[1]
    yield up
    server.close()


def transport_to(
    port: int, *, pipelining: bool | None = None, timeout: str = "5s", **settings: object
) -> SmtpTransport:
    if pipelining is not None:
        settings["pipelining"] = pipelining
    config = DeliveryConfig.model_validate(
        {"upstream": f"smtp://127.0.0.1:{port}", "starttls": "off", "timeout": timeout, **settings}
    )
    return SmtpTransport(config)


def unstuffed(wire: bytes) -> bytes:
    """What the server keeps of a DATA section (RFC 5321 §4.5.2)."""
    lines = wire.split(b"\r\n")
    return b"\r\n".join(line[1:] if line[:1] == b"." else line for line in lines)


# --- pipelining -----------------------------------------------------------------------


async def test_mail_rcpt_and_data_arrive_in_one_read_before_any_reply(scripted: Scripted) -> None:
    scripted.withhold = True  # no reply before DATA: a client waiting for one would time out
    transport = transport_to(scripted.port, timeout="2s")
    try:
        results = await transport.send(
            "alice@example.com", ["b@client.example", "c@x.example"], MESSAGE
        )
    finally:
        await transport.close()
    assert results == {
        "b@client.example": (250, "2.0.0 Ok: queued"),
        "c@x.example": (250, "2.0.0 Ok: queued"),
    }
    (group,) = scripted.envelope_reads()
    assert group == (
        b"MAIL FROM:<alice@example.com> SIZE=%d\r\nRCPT TO:<b@client.example>\r\n"
        b"RCPT TO:<c@x.example>\r\nDATA\r\n" % len(MESSAGE)
    )
    assert scripted.wire_bodies == [MESSAGE]


async def test_server_without_pipelining_gets_one_command_per_read(scripted: Scripted) -> None:
    scripted.pipelining = False
    transport = transport_to(scripted.port)
    try:
        results = await transport.send(
            "alice@example.com", ["b@client.example", "c@x.example"], MESSAGE
        )
    finally:
        await transport.close()
    assert set(results.values()) == {(250, "2.0.0 Ok: queued")}
    assert [r.count(b"\r\n") for r in scripted.envelope_reads()] == [1, 1, 1]
    assert scripted.wire_bodies == [MESSAGE]


async def test_each_recipient_keeps_its_own_reply_as_without_pipelining(scripted: Scripted) -> None:
    replies = {
        "gone@client.example": "550 5.1.1 <gone@client.example>: Recipient address rejected",
        "full@client.example": "452 4.2.2 Mailbox full",
        "fwd@client.example": "251 2.1.5 User not local; will forward",
    }
    scripted.rcpt_reply = lambda address: replies.get(address, "250 2.1.5 Ok")
    rcpts = [
        "ok@client.example",
        "gone@client.example",
        "full@client.example",
        "fwd@client.example",
    ]
    outcomes = []
    for pipelining in (True, False):
        transport = transport_to(scripted.port, pipelining=pipelining)
        try:
            outcomes.append(await transport.send("alice@example.com", rcpts, MESSAGE))
        finally:
            await transport.close()
    assert (
        outcomes[0]
        == outcomes[1]
        == {
            "ok@client.example": (250, "2.0.0 Ok: queued"),
            "gone@client.example": (550, replies["gone@client.example"][4:]),
            "full@client.example": (452, "4.2.2 Mailbox full"),
            "fwd@client.example": (250, "2.0.0 Ok: queued"),
        }
    )
    assert scripted.wire_bodies == [MESSAGE, MESSAGE]


@pytest.mark.parametrize(
    ("reply", "failure", "status"),
    [("553 5.7.1 Sender address rejected", PermanentFailure, "5.7.1"),
     ("451 4.3.0 Try again later", TemporaryFailure, "4.3.0")],
)  # fmt: skip
async def test_refused_mail_fails_every_recipient_with_its_reply(
    scripted: Scripted, reply: str, failure: type[Exception], status: str
) -> None:
    scripted.mail_reply = reply
    raised = []
    for pipelining in (True, False):
        transport = transport_to(scripted.port, pipelining=pipelining)
        try:
            with pytest.raises(failure) as error:
                await transport.send(
                    "alice@example.com", ["b@client.example", "c@x.example"], MESSAGE
                )
        finally:
            await transport.close()
        raised.append(error.value)
    for each in raised:
        assert isinstance(each, PermanentFailure | TemporaryFailure)
        assert (each.code, each.status, each.message) == (int(reply[:3]), status, reply[4:])
    assert scripted.wire_bodies == []


async def test_all_recipients_refused_then_the_same_connection_carries_the_next_message(
    scripted: Scripted,
) -> None:
    scripted.rcpt_reply = lambda address: (
        "550 5.1.1 No such user" if address.startswith("gone") else "250 2.1.5 Ok"
    )
    transport = transport_to(scripted.port)
    try:
        refused = await transport.send(
            "alice@example.com", ["gone1@client.example", "gone2@client.example"], MESSAGE
        )
        delivered = await transport.send("alice@example.com", ["ok@client.example"], MESSAGE)
    finally:
        await transport.close()
    assert refused == {
        "gone1@client.example": (550, "5.1.1 No such user"),
        "gone2@client.example": (550, "5.1.1 No such user"),
    }
    assert delivered == {"ok@client.example": (250, "2.0.0 Ok: queued")}
    assert b"RSET\r\n" in scripted.commands
    assert scripted.connections == 1 and scripted.wire_bodies == [MESSAGE]


async def test_354_without_an_accepted_recipient_gets_an_empty_message_then_rset(
    scripted: Scripted,
) -> None:
    scripted.rcpt_reply = lambda _address: "550 5.1.1 No such user"
    scripted.data_reply = "354 go ahead"  # a server that should have said 554 (RFC 2920 §3.1)
    transport = transport_to(scripted.port)
    try:
        results = await transport.send("alice@example.com", ["gone@client.example"], MESSAGE)
        scripted.rcpt_reply = lambda _address: "250 2.1.5 Ok"
        delivered = await transport.send("alice@example.com", ["ok@client.example"], MESSAGE)
    finally:
        await transport.close()
    assert results == {"gone@client.example": (550, "5.1.1 No such user")}
    assert delivered == {"ok@client.example": (250, "2.0.0 Ok: queued")}
    assert scripted.wire_bodies == [b"", MESSAGE]  # the message never went with nobody to get it
    assert scripted.commands.count(b"RSET\r\n") == 1 and scripted.connections == 1


async def test_421_to_a_recipient_ends_the_transaction_and_the_connection(
    scripted: Scripted,
) -> None:
    scripted.rcpt_reply = lambda address: (
        "421 4.3.2 Shutting down" if address.startswith("b") else "250 2.1.5 Ok"
    )
    transport = transport_to(scripted.port)
    try:
        with pytest.raises(TemporaryFailure) as failure:
            await transport.send(
                "alice@example.com", ["a@client.example", "b@client.example"], MESSAGE
            )
        scripted.rcpt_reply = lambda _address: "250 2.1.5 Ok"
        await transport.send("alice@example.com", ["a@client.example"], MESSAGE)
    finally:
        await transport.close()
    assert (failure.value.code, failure.value.status) == (421, "4.3.2")
    assert scripted.connections == 2 and scripted.wire_bodies == [MESSAGE]


# --- the body --------------------------------------------------------------------------

DOTTED = (
    b".starts with a dot\r\nSubject: dots\r\n\r\n.\r\n..\r\n...\r\n. \r\n.x\r\nx.\r\n"
    b"middle\r\n.\r\n\r\n.\r\nend with a dot line\r\n.\r\n"
)


async def test_lines_with_leading_dots_round_trip_byte_exact(
    aiosmtpd_upstream: PipeliningUpstream,
) -> None:
    transport = transport_to(aiosmtpd_upstream.port)
    try:
        results = await transport.send("alice@example.com", ["b@client.example"], DOTTED)
    finally:
        await transport.close()
    assert results == {"b@client.example": (250, "2.0.0 Ok: upstream queued")}
    assert [r.data for r in aiosmtpd_upstream.received] == [DOTTED]


async def test_the_wire_carries_each_leading_dot_doubled(scripted: Scripted) -> None:
    transport = transport_to(scripted.port)
    try:
        await transport.send("alice@example.com", ["b@client.example"], DOTTED)
    finally:
        await transport.close()
    (wire,) = scripted.wire_bodies
    assert wire == (
        b"..starts with a dot\r\nSubject: dots\r\n\r\n..\r\n...\r\n....\r\n.. \r\n..x\r\nx.\r\n"
        b"middle\r\n..\r\n\r\n..\r\nend with a dot line\r\n..\r\n"
    )


async def test_a_large_message_goes_out_in_windows_with_flow_control(
    aiosmtpd_upstream: PipeliningUpstream,
) -> None:
    line = b"x" * 76 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + (line * 999 + b".dot line\r\n") * 60  # ~4.7 MB
    transport = transport_to(aiosmtpd_upstream.port, timeout="30s")
    try:
        results = await transport.send("alice@example.com", ["b@client.example"], big)
    finally:
        await transport.close()
    assert results == {"b@client.example": (250, "2.0.0 Ok: upstream queued")}
    assert aiosmtpd_upstream.received[0].data == big


async def test_bare_line_ends_are_made_crlf_before_sending(scripted: Scripted) -> None:
    # Intake stores CRLF only; whatever else comes this way still leaves as CRLF, and a
    # dot after a bare LF cannot end the message early at the next hop.
    transport = transport_to(scripted.port)
    try:
        await transport.send(
            "alice@example.com", ["b@client.example"], b"Subject: x\r\n\nA\n.\nB\rC"
        )
    finally:
        await transport.close()
    assert scripted.wire_bodies == [b"Subject: x\r\n\r\nA\r\n..\r\nB\r\nC\r\n"]


async def test_size_and_8bitmime_and_smtputf8_are_declared(scripted: Scripted) -> None:
    data = "Subject: Grüße\r\n\r\nÄ\r\n".encode()
    transport = transport_to(scripted.port)
    try:
        await transport.send("alice@example.com", ["b@client.example"], data)
        await transport.send("ålice@example.com", ["b@client.example"], MESSAGE)
    finally:
        await transport.close()
    mails = [c for c in scripted.commands if c.startswith(b"MAIL")]
    assert mails == [
        b"MAIL FROM:<alice@example.com> SIZE=%d BODY=8BITMIME\r\n" % len(data),
        f"MAIL FROM:<ålice@example.com> SIZE={len(MESSAGE)} SMTPUTF8\r\n".encode(),
    ]
    assert scripted.wire_bodies == [data, MESSAGE]


LINES = [b"", b".", b"..", b".x", b"x", b"x.", b"a.b", b". ", b"\xe3\x81\x82", b"\r", b"\n"]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(LINES), max_size=12).map(lambda lines: b"\r\n".join(lines)),
    st.sampled_from([b"", b"\r\n"]),
    st.integers(min_value=1, max_value=16),
)
def test_dot_stuffing_in_windows_is_undone_exactly_by_the_server(
    text: bytes, ending: bytes, window: int
) -> None:
    message = text + ending
    wire = b"".join(dot_stuffed(message, window))
    assert wire.endswith(b"\r\n.\r\n")
    section = wire[: -len(b".\r\n")]
    assert not re.search(rb"\r(?!\n)|(?<!\r)\n", section)  # CRLF only
    lines = section.split(b"\r\n")[:-1]
    assert all(not (line.startswith(b".") and not line.startswith(b"..")) for line in lines)
    expected = normalize_newlines(message)
    if not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuffed(section) == expected


# --- failures --------------------------------------------------------------------------


@pytest.mark.parametrize("drop_on", [b"MAIL", b"DATA", b"body"])
async def test_connection_dropped_mid_transaction_defers_and_is_never_reused(
    scripted: Scripted, drop_on: bytes
) -> None:
    scripted.drop_on = drop_on  # "body": the first line of the message
    transport = transport_to(scripted.port)
    data = b"body line\r\n" + MESSAGE
    try:
        with pytest.raises(TemporaryFailure) as failure:
            await transport.send("alice@example.com", ["b@client.example"], data)
        again = await transport.send("alice@example.com", ["b@client.example"], MESSAGE)
    finally:
        await transport.close()
    assert (failure.value.code, failure.value.status) == (421, "4.4.2")
    assert "upstream connection failed" in failure.value.message
    assert again == {"b@client.example": (250, "2.0.0 Ok: queued")}
    assert scripted.connections == 2 and scripted.wire_bodies == [MESSAGE]


async def test_a_reply_that_never_comes_times_out_into_a_deferral(scripted: Scripted) -> None:
    scripted.silent_on = b"MAIL"
    transport = transport_to(scripted.port, timeout="300ms")
    try:
        with pytest.raises(TemporaryFailure) as failure:
            await transport.send("alice@example.com", ["b@client.example"], MESSAGE)
        scripted.silent_on = None
        again = await transport.send("alice@example.com", ["b@client.example"], MESSAGE)
    finally:
        await transport.close()
    assert (failure.value.code, failure.value.status) == (421, "4.4.2")
    assert again == {"b@client.example": (250, "2.0.0 Ok: queued")}
    assert scripted.connections == 2


async def test_a_malformed_reply_defers_and_drops_the_connection(scripted: Scripted) -> None:
    scripted.rcpt_reply = lambda _address: "what?"
    transport = transport_to(scripted.port)
    try:
        with pytest.raises(TemporaryFailure):
            await transport.send("alice@example.com", ["b@client.example"], MESSAGE)
        scripted.rcpt_reply = lambda _address: "250 2.1.5 Ok"
        await transport.send("alice@example.com", ["b@client.example"], MESSAGE)
    finally:
        await transport.close()
    assert scripted.connections == 2 and scripted.wire_bodies == [MESSAGE]


def test_the_same_holds_on_uvloop_which_serve_runs() -> None:
    async def on_a_new_server(scenario: Callable[[Scripted], Awaitable[None]]) -> None:
        server = Scripted()
        listener = await asyncio.start_server(server.session, "127.0.0.1", 0)
        server.port = listener.sockets[0].getsockname()[1]
        try:
            await scenario(server)
        finally:
            listener.close()

    async def scenarios() -> None:
        await on_a_new_server(test_mail_rcpt_and_data_arrive_in_one_read_before_any_reply)
        await on_a_new_server(
            test_all_recipients_refused_then_the_same_connection_carries_the_next_message
        )
        for drop_on in (b"DATA", b"body"):
            await on_a_new_server(
                lambda server, d=drop_on: (
                    test_connection_dropped_mid_transaction_defers_and_is_never_reused(server, d)
                )
            )

    uvloop.run(scenarios())


# --- addresses -------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.from_regex(_PLAIN_ADDRESS, fullmatch=True))
def test_plain_addresses_are_quoted_as_aiosmtplib_quotes_them(address: str) -> None:
    assert _quoted(address) == quote_address(address)


@pytest.mark.parametrize(
    "address",
    ["", "Alice <alice@example.com>", '"a b"@example.com', "a@[127.0.0.1]", "a@x.com\r\nDATA"],
)
def test_other_addresses_are_quoted_by_aiosmtplib(address: str) -> None:
    assert _quoted(address) == quote_address(address)
    assert "\r" not in _quoted(address) and "\n" not in _quoted(address)


async def test_an_address_with_a_control_character_is_refused_before_anything_is_sent(
    scripted: Scripted,
) -> None:
    sent = []
    for pipelining in (True, False):  # aiosmtplib's sendmail refuses it too, at its RCPT
        transport = transport_to(scripted.port, pipelining=pipelining)
        try:
            with pytest.raises(ValueError):
                await transport.send("alice@example.com", ["b\x00c@client.example"], MESSAGE)
        finally:
            await transport.close()
        sent.append([c for c in scripted.commands if c.startswith((b"MAIL", b"RCPT"))])
    assert sent[0] == [] and not any(c.startswith(b"RCPT") for c in sent[1])


async def test_a_reply_nobody_asked_for_retires_the_connection(scripted: Scripted) -> None:
    # Out of step, the next transaction could take it for the reply to its MAIL.
    scripted.final_reply = "250 2.0.0 Ok: queued\r\n250 2.0.0 Ok: queued twice"
    transport = transport_to(scripted.port)
    try:
        first = await transport.send("alice@example.com", ["b@client.example"], MESSAGE)
        second = await transport.send("alice@example.com", ["b@client.example"], MESSAGE)
    finally:
        await transport.close()
    assert first == second == {"b@client.example": (250, "2.0.0 Ok: queued")}
    assert scripted.connections == 2


# --- the connection pool ---------------------------------------------------------------


async def test_pipelining_off_in_the_config_sends_one_command_per_read(scripted: Scripted) -> None:
    config = DeliveryConfig.model_validate(
        {"upstream": f"smtp://127.0.0.1:{scripted.port}", "starttls": "off", "pipelining": False}
    )
    transport = SmtpTransport(config)
    try:
        results = await transport.send(
            "alice@example.com", ["b@client.example", "c@x.example"], MESSAGE
        )
    finally:
        await transport.close()
    assert scripted.pipelining  # offered, and not used
    assert set(results.values()) == {(250, "2.0.0 Ok: queued")}
    assert [r.count(b"\r\n") for r in scripted.envelope_reads()] == [1, 1, 1]


@pytest.mark.parametrize(
    "key", ["idle_close", "timeout", "retry_initial", "lease", "poll_interval"]
)
def test_delivery_waits_and_periods_must_be_positive(key: str) -> None:
    # A zero lease, say, would have the lease keeper renew in a loop that never sleeps.
    from gateway.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as refused:
        parse_config({"delivery": {"upstream": "smtp://127.0.0.1:25", key: "0s"}, "smtp": {}})
    assert f"delivery.{key}: must be longer than 0s" in refused.value.problems
    DeliveryConfig.model_validate({"upstream": "smtp://127.0.0.1:25", key: "1s"})


def quits(server: Scripted) -> int:
    return sum(1 for c in server.commands if c.upper().startswith(b"QUIT"))


async def test_the_pool_grows_under_load_and_closes_idle_connections_with_quit(
    scripted: Scripted,
) -> None:
    transport = transport_to(scripted.port, connections=3, idle_close="0.3s")
    try:
        sends = [transport.send("a@example.com", [f"r{n}@x.example"], MESSAGE) for n in range(3)]
        await asyncio.gather(*sends)
        assert (scripted.connections, transport.open_connections, quits(scripted)) == (3, 3, 0)
        await asyncio.sleep(0.7)
        assert (transport.open_connections, quits(scripted)) == (0, 3)
        # The pool is empty, not broken: the next message opens a connection.
        results = await transport.send("a@example.com", ["r@x.example"], MESSAGE)
        assert results == {"r@x.example": (250, "2.0.0 Ok: queued")}
        assert scripted.connections == 4
    finally:
        await transport.close()
    assert quits(scripted) == 4  # close() says QUIT on the last one too


async def test_under_light_load_the_newest_connection_is_reused_and_the_rest_age_out(
    scripted: Scripted,
) -> None:
    transport = transport_to(scripted.port, connections=3, idle_close="0.4s")
    try:
        await asyncio.gather(
            *(transport.send("a@example.com", [f"r{n}@x.example"], MESSAGE) for n in range(3))
        )
        for n in range(8):  # one message every 0.1 s: one connection is enough
            await transport.send("a@example.com", [f"s{n}@x.example"], MESSAGE)
            await asyncio.sleep(0.1)
        assert scripted.connections == 3  # none opened anew
        assert (transport.open_connections, quits(scripted)) == (1, 2)
    finally:
        await transport.close()


def test_a_bytearray_message_is_sent_as_the_same_bytes() -> None:
    # Encryption's output is a bytearray: each window goes out as bytes, the same ones.
    from gateway.smtp_out import dot_stuffed

    message = b"".join(b".line %d\r\n" % n for n in range(3000)) + b"end\r\n"
    for window in (64, 1000, 1 << 20):
        pieces = list(dot_stuffed(bytearray(message), window))
        assert all(type(piece) is bytes for piece in pieces)
        assert pieces == list(dot_stuffed(message, window))
