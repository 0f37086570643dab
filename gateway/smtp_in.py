"""The SMTP edge: aiosmtpd in our own event loop, mapping SMTP onto intake calls.

No policy, encryption or SQL here: each hook checks the protocol-level rules
(relay, sender ownership, limits) and returns a reply string.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, syntax

from gateway.audit import AuditLog
from gateway.config import AuthMode, SmtpConfig
from gateway.credentials import Credentials, Principal
from gateway.intake import Intake, Submission
from gateway.smtp_data import Refused, read_data
from gateway.smtp_tables import CachedInitSMTP

log = logging.getLogger(__name__)

CODE_AUTH_REQUIRED = "530 5.7.0 Authentication required"
CODE_SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
IDENT = "Sekisho ESMTP"


@dataclass(slots=True)
class Counters:
    """Shared by every session of one listener."""

    active: int = 0
    draining: bool = False
    auth_failures: dict[str, int] = field(default_factory=dict)


def _ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(peer[0]) if peer else None
    except (ValueError, TypeError, IndexError):
        return None


class Handler:
    def __init__(
        self,
        config: SmtpConfig,
        intake: Intake,
        credentials: Credentials,
        audit: AuditLog,
        counters: Counters,
    ) -> None:
        self.config = config
        self.intake = intake
        self.credentials = credentials
        self.audit = audit
        self.counters = counters

    # -- EHLO: aiosmtpd builds the list; we add PIPELINING and hide an empty AUTH line.
    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        kept = [r for r in responses if r.strip() != "250-AUTH"]
        kept.insert(1, "250-PIPELINING")
        return kept

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if self.counters.draining:
            # A session open at shutdown finishes the transaction it is in, but starts
            # no new one: otherwise a busy client keeps the drain going for the whole
            # grace period. RFC 5321 §3.8: 421, then the server closes the channel.
            return CODE_SHUTTING_DOWN
        refusal = self._relay_refusal(session)
        if refusal:
            return refusal
        principal: Principal | None = session.auth_data if session.authenticated else None
        if principal is not None and not principal.may_send_as(address):
            self.audit.emit(
                "auth.sender_mismatch",
                actor=principal.name,
                mail_from=address,
                client=_peer(session),
            )
            return (
                f"553 5.7.1 Sender address <{address}> is not one of {principal.name}'s addresses"
            )
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    def _relay_refusal(self, session: Session) -> str | None:
        if session.authenticated:
            return None
        trusted = self._trusted(session)
        match self.config.auth:
            case AuthMode.OFF:
                return (
                    None
                    if trusted
                    else "550 5.7.1 Relay access denied: client not in trusted_networks"
                )
            case AuthMode.OPTIONAL:
                return None if trusted else CODE_AUTH_REQUIRED
            case AuthMode.REQUIRED:
                return CODE_AUTH_REQUIRED

    def _trusted(self, session: Session) -> bool:
        ip = _ip(session.peer)
        return ip is not None and any(ip in net for net in self.config.trusted_networks)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.lower() in (r.lower() for r in envelope.rcpt_tos):
            # The same address twice (To and Cc, say) is one recipient: one copy.
            return "250 2.1.5 OK (duplicate recipient)"
        if len(envelope.rcpt_tos) >= self.config.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 tells the client to send the rest in another transaction.
            return "452 4.5.3 Too many recipients"
        local, at, domain = address.rpartition("@")
        if (
            not at
            or not local
            or not domain
            or ("." not in domain.strip("[]") and not domain.startswith("["))
        ):
            return "553 5.1.3 Recipient address must be a full address like user@example.com"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        principal: Principal | None = session.auth_data if session.authenticated else None
        content = envelope.original_content or b""
        return await self.intake.submit(
            Submission(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=bytes(content),
                client_address=_peer(session),
                helo=session.host_name,
                sender_user=principal.name if principal else None,
                sender_groups=principal.groups if principal else (),
            )
        )

    async def handle_exception(self, error: Exception) -> str:
        log.exception("SMTP session error", exc_info=error)
        return "451 4.3.0 Internal error; please try again later"

    # -- AUTH, implemented here so the password check can be awaited off the loop.
    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:
        blob = await _initial_or_challenge(server, args, "")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await server.push("501 5.5.2 Cannot split the AUTH PLAIN value")
            return AuthResult(success=False, handled=True)
        return await self._check(server, parts[1], parts[2])

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:
        login = await _initial_or_challenge(server, args, "User Name")
        if login is None:
            return AuthResult(success=False, handled=True)
        password = await _challenge(server, "Password")
        if password is None:
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        session = server.session
        peer = _peer(session)
        failures = self.counters.auth_failures.get(peer, 0)
        if failures:
            # Slow down guessing from one address: 0.5 s per recent failure, up to 5 s.
            await asyncio.sleep(min(5.0, 0.5 * failures))
        name = login.decode("utf-8", "replace")
        principal = await self.credentials.check(name, password.decode("utf-8", "replace"))
        if principal is None:
            self.counters.auth_failures[peer] = failures + 1
            if len(self.counters.auth_failures) > 10_000:
                self.counters.auth_failures.clear()
            self.audit.emit("auth.failed", actor=f"client:{peer}", login=name[:128])
            return AuthResult(success=False, handled=False)
        self.counters.auth_failures.pop(peer, None)
        self.audit.emit("auth.succeeded", actor=principal.name, client=peer)
        return AuthResult(success=True, auth_data=principal)


async def _initial_or_challenge(server: SMTP, args: list[str], prompt: str) -> bytes | None:
    if len(args) == 1:
        return await _challenge(server, prompt)
    try:
        return base64.b64decode(args[1].encode(), validate=True)
    except (binascii.Error, ValueError):
        await server.push("501 5.5.2 Cannot decode base64")
        return None


async def _challenge(server: SMTP, prompt: str) -> bytes | None:
    answer = await server.challenge_auth(prompt)
    return None if not isinstance(answer, bytes) else answer


def _peer(session: Session | None) -> str:
    peer = session.peer if session else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


# RFC 5321 §4.1.2: a path with a Dot-string local part and a plain domain, the form
# nearly every client sends. aiosmtpd hands every path to the email package's header
# parser (and defines a class per call): ~13 % of the gateway's CPU under relay load.
# Also what `gateway.smtp_out` writes without aiosmtplib's quoting: the same form.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
PLAIN_ADDRESS = rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_SIMPLE_PATH = re.compile(rf"<({PLAIN_ADDRESS})>")


class GatewaySMTP(CachedInitSMTP):
    """aiosmtpd's SMTP with a connection cap, an error budget, loopback-only AUTH
    without TLS, DATA read into one buffer (`gateway.smtp_data`), and the reflection
    of its constructor done once per class (`gateway.smtp_tables`)."""

    def __init__(
        self,
        handler: Handler,
        counters: Counters,
        max_connections: int,
        max_errors: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        if self._decode_data:
            raise ValueError("GatewaySMTP hands the handler bytes: decode_data must be False")
        self._counters = counters
        self._max_connections = max_connections
        self._max_errors = max_errors
        self._errors = 0
        self._refused = False
        self._counted = False
        self._continued: list[bytes] = []  # lines of a reply not yet written (push)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parse of a MAIL/RCPT path, with a fast path for the plain form;
        anything else (quoted, source routes, comments, odd spacing) takes the full one."""
        match = _SIMPLE_PATH.match(arg)
        if match is None:
            return super()._getaddr(arg)
        address, rest = match.group(1), arg[match.end() :]
        params = rest.lstrip(" \t")
        if (rest and params == rest) or params.startswith("("):
            return super()._getaddr(arg)
        limit = self.local_part_limit
        if limit and len(address.rpartition("@")[0]) > limit:
            return super()._getaddr(arg)
        return address, params

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and not self._counted:
            if self._counters.active >= self._max_connections or self._counters.draining:
                self._refused = True
                assert isinstance(transport, asyncio.WriteTransport)
                reason = "shutting down" if self._counters.draining else "too many connections"
                transport.write(f"421 4.3.2 {reason}, try again later\r\n".encode())
                transport.close()
                return
            self._counters.active += 1
            self._counted = True
        super().connection_made(transport)
        ip = _ip(self.session.peer if self.session else None)
        # AUTH needs TLS (so passwords never cross the network in clear), except on
        # loopback, where nothing crosses a network.
        self._auth_require_tls = not (ip is not None and ip.is_loopback)

    def connection_lost(self, error: Exception | None) -> None:
        if self._refused:
            return
        if self._counted:
            self._counters.active -= 1
            self._counted = False
        super().connection_lost(error)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4.6's DATA, the same checks and replies in the same order, with the
        content read by `read_data`: one bytes object, never a list of lines."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await read_data(
                self._reader,
                self.data_size_limit,
                self.line_length_limit,
                lambda: self.transport is not None,
            )
        except asyncio.CancelledError:
            log.info("Connection lost during DATA")
            self._writer.close()
            raise
        if content is None:  # the connection went before the end of data: nothing to accept
            return
        if isinstance(content, Refused):
            await self.push(content.reply)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        # decode_data=False: the handler reads original_content, and content is the
        # same object, not a copy.
        self.envelope.content = self.envelope.original_content = content
        del content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def push(self, status: Any) -> None:
        """aiosmtpd writes every line of a reply on its own (EHLO's six are six sends);
        a continuation line ("250-…") waits here and goes out with its reply's last
        line, in one write."""
        line = (
            status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
            if isinstance(status, str)
            else status
        )
        if line[3:4] == b"-" and b"\n" not in line:  # one line of a reply, not all of it
            self._continued.append(line)
            return
        if self._continued:
            self._continued.append(line)
            line = b"\r\n".join(self._continued)
            self._continued.clear()
        await super().push(line)
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        if text.startswith("421") and self.transport is not None:
            self.transport.close()
        elif text[:1] == "5":
            self._errors += 1
            if self._errors >= self._max_errors and self.transport is not None:
                await super().push("421 4.7.0 Too many errors, closing connection")
                self.transport.close()


def tls_context(config: SmtpConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return context


def smtp_factory(config: SmtpConfig, handler: Handler, counters: Counters) -> Callable[[], SMTP]:
    context = tls_context(config)
    auth_off = config.auth is AuthMode.OFF

    def factory() -> SMTP:
        return GatewaySMTP(
            handler,
            counters,
            config.max_connections,
            config.max_errors,
            hostname=config.hostname,
            ident=IDENT,
            data_size_limit=config.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=context,
            require_starttls=config.require_tls,
            auth_require_tls=True,
            auth_exclude_mechanism=["PLAIN", "LOGIN"] if auth_off else None,
            timeout=config.idle_timeout.total_seconds(),
            command_call_limit={
                "AUTH": 5,
                "NOOP": 100,
                "RSET": 1000,
                "VRFY": 10,
                "HELP": 10,
                "EHLO": 20,
                "HELO": 20,
                "STARTTLS": 2,
                "*": 100_000,
            },
        )

    return factory


async def start_smtp(
    config: SmtpConfig, handler: Handler, counters: Counters, *, reuse_port: bool = False
) -> asyncio.Server:
    """Listen on [smtp].listen; `reuse_port` joins the SO_REUSEPORT group of the other
    `serve --workers` processes on the same port."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        smtp_factory(config, handler, counters),
        host=config.listen.host,
        port=config.listen.port,
        reuse_address=True,
        reuse_port=reuse_port or None,
        backlog=1024,
    )


__all__ = ["Counters", "GatewaySMTP", "Handler", "start_smtp", "tls_context"]
