"""Upstream transports: the smarthost over SMTP (pooled), or a maildir for trials.

`send` returns each recipient's (code, text). A failure of the whole transaction
(connection, MAIL FROM, DATA) raises TemporaryFailure or PermanentFailure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiosmtplib
from aiosmtplib import SMTPRecipientsRefused, SMTPResponseException

from gateway import smtp_out
from gateway.config import DeliveryConfig, StartTls
from gateway.errors import PermanentFailure, TemporaryFailure

Results = dict[str, tuple[int, str]]


class Transport(Protocol):
    async def send(
        self, mail_from: str, rcpts: Sequence[str], data: bytes | bytearray
    ) -> Results: ...
    async def close(self) -> None: ...


def _failure(code: int, text: str) -> TemporaryFailure | PermanentFailure:
    status = text.split(" ", 1)[0] if text[:2] in ("4.", "5.") else None
    if 500 <= code < 600:
        return PermanentFailure(text, code=code, status=status or "5.0.0")
    return TemporaryFailure(text, code=code if 400 <= code < 500 else 451, status=status or "4.0.0")


class SmtpTransport:
    """aiosmtplib clients kept open and reused; one transaction per client at a time.

    A transaction is pipelined when the server offers PIPELINING (RFC 2920; see
    gateway/smtp_out.py), unless `[delivery] pipelining` is false (as
    Postfix's `smtp_discard_ehlo_keywords = pipelining`, for a server that offers it but
    breaks under it); otherwise it is aiosmtplib's `sendmail`, one round trip per command.

    The most recently used idle connection is taken first, so under light load the
    others stay unused, and one unused for `[delivery] idle_close` is closed with QUIT:
    the pool grows to `connections` under load and shrinks back after it, as Postfix's
    connection cache does (`smtp_connection_cache_time_limit`)."""

    def __init__(self, config: DeliveryConfig) -> None:
        self._config = config
        self._pipelining = config.pipelining
        self._idle_close = config.idle_close.total_seconds()
        # (when it was given back, client): the oldest first, the next one taken last.
        self._idle: list[tuple[float, aiosmtplib.SMTP]] = []
        self._slots = asyncio.Semaphore(config.connections)
        self._reaper: asyncio.TimerHandle | None = None
        self._quitting: set[asyncio.Task[None]] = set()

    async def send(self, mail_from: str, rcpts: Sequence[str], data: bytes | bytearray) -> Results:
        async with self._slots:
            client = await self._checkout()
            try:
                results = await self._transact(client, mail_from, rcpts, data)
            except BaseException:
                client.close()
                raise
            self._give_back(client)
            return results

    @property
    def open_connections(self) -> int:
        """Idle connections kept for the next transaction."""
        return len(self._idle)

    async def _checkout(self) -> aiosmtplib.SMTP:
        while self._idle:
            _, client = self._idle.pop()
            if client.is_connected:
                return client
        return await self._connect()

    def _give_back(self, client: aiosmtplib.SMTP) -> None:
        loop = asyncio.get_running_loop()
        self._idle.append((loop.time(), client))
        if self._reaper is None:
            self._reaper = loop.call_later(self._idle_close, self._reap)

    def _reap(self) -> None:
        """Close the connections unused for `idle_close`; look again when the next one
        would be."""
        self._reaper = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._idle_close
        stale = [client for since, client in self._idle if since <= cutoff]
        self._idle = [(since, client) for since, client in self._idle if since > cutoff]
        for client in stale:
            task = loop.create_task(_quit(client))
            self._quitting.add(task)
            task.add_done_callback(self._quitting.discard)
        if self._idle:
            self._reaper = loop.call_later(self._idle[0][0] - cutoff, self._reap)

    async def _connect(self) -> aiosmtplib.SMTP:
        config = self._config
        upstream = config.upstream
        # start_tls=None would upgrade only when STARTTLS is advertised, which a
        # man in the middle can strip (FIELD-NOTES); `required` insists on it.
        start_tls = {StartTls.REQUIRED: True, StartTls.OPPORTUNISTIC: None, StartTls.OFF: False}[
            config.starttls
        ]
        client = aiosmtplib.SMTP(
            hostname=upstream.host,
            port=upstream.port,
            use_tls=upstream.scheme == "smtps",
            start_tls=None if upstream.scheme == "smtps" else start_tls,
            validate_certs=config.verify_certificate,
            timeout=config.timeout.total_seconds(),
            local_hostname=config.helo_name,
            username=config.username,
            password=config.password.get_secret_value() if config.password else None,
        )
        try:
            await client.connect()
            await client.ehlo()
        except SMTPResponseException as error:
            client.close()
            # A refusal while connecting, greeting or authenticating (a rotated
            # password answered 535, say) says nothing about any message: retry,
            # never bounce the queue (Postfix: smtp_sasl_auth_soft_bounce).
            auth = isinstance(error, aiosmtplib.SMTPAuthenticationError)
            raise TemporaryFailure(
                f"upstream refused the session: {error.code} {error.message}",
                code=454 if auth else 421,
                status="4.7.0" if auth else "4.4.2",
            ) from None
        except (TimeoutError, OSError, aiosmtplib.SMTPException) as error:
            client.close()
            raise TemporaryFailure(
                f"cannot connect to {upstream}: {_describe(error)}", code=421, status="4.4.1"
            ) from None
        return client

    async def _transact(
        self, client: aiosmtplib.SMTP, mail_from: str, rcpts: Sequence[str], data: bytes | bytearray
    ) -> Results:
        options = []
        if client.supports_extension("8bitmime") and not data.isascii():
            options.append("BODY=8BITMIME")  # aiosmtplib does not add it by itself
        if not all(a.isascii() for a in (mail_from, *rcpts)):
            options.append("SMTPUTF8")
        try:
            if self._pipelining and client.supports_extension("pipelining"):
                refused, reply = await smtp_out.sendmail(
                    client, mail_from, rcpts, data, mail_options=options
                )
            else:
                # aiosmtplib takes bytes only: a bytearray (encrypted) is copied once here.
                message = data if isinstance(data, bytes) else bytes(data)
                refused, reply = await client.sendmail(
                    mail_from, list(rcpts), message, mail_options=options
                )
        except SMTPRecipientsRefused as error:
            return {e.recipient: (e.code, e.message) for e in error.recipients}
        except SMTPResponseException as error:
            raise _failure(error.code, error.message) from None
        except (TimeoutError, OSError, aiosmtplib.SMTPException) as error:
            # Includes a connection dropped before the DATA reply: not delivered, retry.
            raise TemporaryFailure(
                f"upstream connection failed: {_describe(error)}", code=421, status="4.4.2"
            ) from None
        results: Results = {r: (250, reply) for r in rcpts}
        results.update({r: (resp.code, resp.message) for r, resp in refused.items()})
        return results

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(client) for _, client in idle), *self._quitting)


async def _quit(client: aiosmtplib.SMTP) -> None:
    """QUIT, as a courteous client ends a session (RFC 5321 §4.1.1.10), then close."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.quit(), 2)
    client.close()


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


class MaildirTransport:
    """Writes one file per recipient into `new/`, via `tmp/` and rename, so a reader
    never sees half a message (the maildir protocol)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._host = socket.gethostname().replace("/", "_").replace(":", "_")
        self._count = 0

    async def send(self, mail_from: str, rcpts: Sequence[str], data: bytes | bytearray) -> Results:
        try:
            await asyncio.to_thread(self._write_all, mail_from, rcpts, data)
        except OSError as error:
            raise TemporaryFailure(
                f"maildir write failed: {error.strerror}", code=451, status="4.3.0"
            ) from None
        return {r: (250, "2.0.0 written to maildir") for r in rcpts}

    def _write_all(self, mail_from: str, rcpts: Sequence[str], data: bytes | bytearray) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(parents=True, exist_ok=True)
        for rcpt in rcpts:
            header = f"Return-Path: <{mail_from}>\r\nDelivered-To: {rcpt}\r\n".encode()
            self._write(header + data)

    def _write(self, blob: bytes | bytearray) -> None:
        self._count += 1
        name = f"{time.time_ns()}.P{os.getpid()}Q{self._count}.{self._host}"
        tmp = self.path / "tmp" / name
        with open(tmp, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(tmp, self.path / "new" / name)

    async def close(self) -> None:
        return None


def make_transport(config: DeliveryConfig) -> Transport:
    upstream = config.upstream
    if upstream.scheme == "maildir":
        assert upstream.path is not None
        return MaildirTransport(upstream.path)
    return SmtpTransport(config)
