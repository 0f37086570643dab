"""Faults that must be survived, each injected for real: a database that goes away, a
write that fails half-way, an upstream that drops or refuses, and a SIGTERM under load.

Each test prints its figures: messages sent, 250'd, delivered, duplicated, lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import queue
import signal
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.app import Gateway
from quarantine import repository
from quarantine.models import Body, Message, Recipient
from quarantine.prepared import Prepared
from tests.conftest import PG_SKIP, PG_URL, Upstream, UpstreamSMTP, gateway_config, running
from tests.test_crash_safety import (
    Client,
    GatewayProcess,
    Tally,
    recipients,
    running_upstream,
    wait_until,
    write_config,
)

MESSAGE = b"From: alice@example.com\r\nTo: x@client.example\r\nSubject: fault\r\n\r\nbody\r\n"


async def submit(port: int, data: bytes = MESSAGE, rcpt: str = "x@client.example") -> str:
    """The reply to DATA (or to whatever refused the transaction), as `code text`."""
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=20)
    await client.connect()
    try:
        _, reply = await client.sendmail("alice@example.com", [rcpt], data)
        return f"250 {reply}"
    except aiosmtplib.SMTPResponseException as error:
        return f"{error.code} {error.message}"
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException):
            await client.quit()


async def poll(check: Any, timeout: float, step: float = 0.05) -> Any:
    """Await `check()` until it is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"not true within {timeout}s"
        await asyncio.sleep(step)


async def recipient_rows(gw: Gateway) -> list[Recipient]:
    async with gw.store.read() as session:
        return list((await session.scalars(select(Recipient).order_by(Recipient.id))).all())


# --- the database goes away -------------------------------------------------------------------


class CuttableProxy:
    """A TCP proxy in front of PostgreSQL that the test can cut: close every
    connection and refuse new ones, then restore on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


@pytest.mark.postgres
@pytest.mark.skipif(not PG_URL, reason=PG_SKIP)
async def test_database_unreachable_answers_451_and_recovers_by_itself(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    if store_url.startswith("sqlite"):
        pytest.skip("the proxy stands in front of PostgreSQL; SQLite is a local file")
    url = make_url(store_url)
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    config = gateway_config(tmp_path, proxied, upstream.port)
    async with running(config) as gw, httpx.AsyncClient() as http:
        readyz = f"http://127.0.0.1:{gw.http_port}/readyz"
        before = await submit(gw.smtp_port)
        assert before.startswith("250 2.0.0 Ok: queued as ")
        await upstream.wait_for(1)

        await proxy.cut()
        during = [await submit(gw.smtp_port) for _ in range(3)]
        ready_during = (await http.get(readyz, timeout=20)).status_code
        assert gw.delivery is not None and not any(t.done() for t in gw._tasks)

        await proxy.start()  # the same port again
        after = await poll(lambda: _accepted(gw.smtp_port), 30, step=0.2)
        ready_after = (await http.get(readyz, timeout=20)).status_code
        received = await upstream.wait_for(2, timeout=20)
        async with gw.store.read() as session:
            stored = await session.scalar(select(func.count()).select_from(Message))
    print(f"\ndatabase cut: during={[r[:9] for r in during]} readyz {ready_during}->{ready_after}")
    assert all(r.startswith("451 4.3.0") for r in during), during
    assert ready_during == 503 and ready_after == 200
    assert after.startswith("250 2.0.0 Ok: queued as ")
    assert len(received) == 2 and stored == 2  # the 451s stored nothing
    await proxy.cut()


async def _accepted(port: int) -> str | None:
    reply = await submit(port)
    if reply.startswith("250"):
        return reply
    assert reply.startswith("451 4.3.0"), reply  # never anything but 451 while recovering
    return None


# --- disk full while committing ---------------------------------------------------------------


async def test_disk_full_in_the_middle_of_a_commit_answers_451_and_writes_nothing(
    tmp_path: Path, store_url: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    class Failing:
        """The recipients' insert: the message and body rows are written, then the
        disk fills (on either path a statement takes: cursor or SQLAlchemy)."""

        def __init__(self, prepared: Prepared) -> None:
            self._prepared = prepared

        def _fail(self) -> None:
            if failures:
                raise failures.pop()

        def execute(self, conn: Any, rows: Any) -> None:
            self._fail()
            self._prepared.execute(conn, rows)

        def returning(self, conn: Any, rows: Any) -> Any:
            self._fail()
            return self._prepared.returning(conn, rows)

    for name in ("_INSERT_RECIPIENTS", "_INSERT_RECIPIENTS_RETURNING"):
        monkeypatch.setattr(repository, name, Failing(getattr(repository, name)))
    config = gateway_config(tmp_path, store_url, upstream.port)
    async with running(config) as gw:
        first = await submit(gw.smtp_port)
        async with gw.store.read() as session:
            after_failure = await _counts(session)
        second = await submit(gw.smtp_port)
        received = await upstream.wait_for(1)
        async with gw.store.read() as session:
            after_success = await _counts(session)
            orphans = await session.scalar(
                select(func.count())
                .select_from(Message)
                .where(~Message.recipients.any())
                .where(Message.kind == "message")
            )
    assert failures == []  # the fault was injected
    assert first.startswith("451 4.3.0"), first
    assert after_failure == (0, 0, 0)  # nothing half-written
    assert second.startswith("250 2.0.0 Ok: queued as ")
    assert after_success == (1, 1, 1) and orphans == 0
    assert len(received) == 1 and received[0].data == MESSAGE
    events = [
        json.loads(line)["event"]
        for line in Path(config.audit.path).read_text().split("\n")
        if line
    ]
    assert events.count("message.tempfail") == 1 and events.count("message.accepted") == 1


async def _counts(session: AsyncSession) -> tuple[int, int, int]:
    counts = []
    for model in (Message, Body, Recipient):
        counts.append(int(await session.scalar(select(func.count()).select_from(model)) or 0))
    return counts[0], counts[1], counts[2]


# --- the upstream drops the connection before answering DATA ---------------------------------


class DroppingUpstream(Upstream):
    """Reads the whole DATA, then hangs up without a reply, `drops` times."""

    drops: int = 0
    dropped: int = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.dropped < self.drops:
            self.dropped += 1
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            return "250 never seen by the client"
        return await super().handle_DATA(server, session, envelope)


@asynccontextmanager
async def serving(handler: Upstream, port: int = 0) -> AsyncIterator[Upstream]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamSMTP(handler, hostname="upstream.test", decode_data=False),
        "127.0.0.1",
        port,
        reuse_address=True,
    )
    handler.port = server.sockets[0].getsockname()[1]
    try:
        yield handler
    finally:
        server.close()


async def test_upstream_dropping_before_the_data_reply_is_retried_not_marked_delivered(
    tmp_path: Path, sqlite_url: str
) -> None:
    up = DroppingUpstream()
    up.drops = 2
    async with serving(up):
        config = gateway_config(tmp_path, sqlite_url, up.port)
        async with running(config) as gw:
            reply = await submit(gw.smtp_port)
            assert reply.startswith("250")
            first = await poll(
                lambda: _states(gw, lambda r: r.attempts >= 1 and r.state == "deferred"), 10
            )
            received = await up.wait_for(1, timeout=15)
            final = await poll(lambda: _states(gw, lambda r: r.state == "delivered"), 10)
    print(f"\nupstream drops: dropped={up.dropped} delivered={len(received)} attempts={final}")
    assert up.dropped == 2
    assert first[0].last_code == 421 and "upstream connection failed" in (
        first[0].last_response or ""
    )
    assert len(received) == 1 and received[0].data == MESSAGE
    assert final[0].attempts == 3
    events = Path(config.audit.path).read_text()
    assert events.count('"event":"delivery.deferred"') == 2
    assert events.count('"event":"delivery.sent"') == 1


async def _states(gw: Gateway, want: Any) -> list[Recipient] | None:
    rows = await recipient_rows(gw)
    return rows if rows and all(want(r) for r in rows) else None


# --- the upstream refuses connections for a while ---------------------------------------------


async def test_upstream_refusing_connections_defers_with_backoff_and_delivers_all_later(
    tmp_path: Path, sqlite_url: str
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here until the upstream "comes back"
    sent = 5
    config = gateway_config(tmp_path, sqlite_url, port, delivery={"bounce_after": "1h"})
    async with running(config) as gw, httpx.AsyncClient() as http:
        ids = [
            (await submit(gw.smtp_port, MESSAGE, f"r{n}@client{n}.example")).split()[-1]
            for n in range(sent)
        ]
        await poll(lambda: _states(gw, lambda r: r.attempts >= 3), 15)
        metrics = (await http.get(f"http://127.0.0.1:{gw.http_port}/metrics")).text
        up = Upstream()
        async with serving(up, port):
            received = await up.wait_for(sent, timeout=15)
            final = await poll(lambda: _states(gw, lambda r: r.state == "delivered"), 10)
            metrics_after = (await http.get(f"http://127.0.0.1:{gw.http_port}/metrics")).text
    deferrals = _deferrals(Path(config.audit.path))
    bounced = [r for r in final if r.state == "bounced"]
    print(
        f"\nupstream down: sent={sent} 250'd={len(ids)} delivered={len(received)} "
        f"deferrals={sum(len(v) for v in deferrals.values())} bounced={len(bounced)}"
    )
    assert 'sekisho_messages{state="queued"} 5.0' in metrics
    assert 'sekisho_messages{state="delivered"} 5.0' in metrics_after
    assert sorted(r.rcpt_tos[0] for r in received) == [
        f"r{n}@client{n}.example" for n in range(sent)
    ]
    assert not bounced and len(final) == sent
    for waits in deferrals.values():
        assert len(waits) >= 3
        # retry_initial 200 ms doubling to retry_max 1 s, with ±20 % jitter
        assert waits[0] < 0.3 and waits[2] > 0.6, waits


async def test_queue_depth_gauge_falls_to_zero_when_the_queue_drains(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(tmp_path, sqlite_url, upstream.port, delivery={"retry_initial": "1s"})
    answers = iter(["451 4.3.0 not now"])
    upstream.data_reply = lambda: next(answers, None)
    async with running(config) as gw, httpx.AsyncClient() as http:
        url = f"http://127.0.0.1:{gw.http_port}/metrics"
        assert (await submit(gw.smtp_port)).startswith("250")
        await poll(lambda: _states(gw, lambda r: r.state == "deferred"), 10)
        while_queued = (await http.get(url)).text
        await upstream.wait_for(1)
        await poll(lambda: _states(gw, lambda r: r.state == "delivered"), 10)
        drained = (await http.get(url)).text
    assert 'sekisho_messages{state="queued"} 1.0' in while_queued
    assert 'sekisho_messages{state="queued"} 1.0' not in drained


def _deferrals(audit: Path) -> dict[str, list[float]]:
    waits: dict[str, list[float]] = {}
    for line in audit.read_text().splitlines():
        entry = json.loads(line)
        if entry["event"] == "delivery.deferred":
            wait = datetime.fromisoformat(entry["retry_at"]) - datetime.fromisoformat(entry["ts"])
            waits.setdefault(entry["rcpt"], []).append(wait.total_seconds())
    return waits


# --- SIGTERM under load -----------------------------------------------------------------------

RESTART_MESSAGES = 600
RESTART_CLIENTS = 5
TERM_AFTER = 100


class RecordingClient(Client):
    """The crash-safety client, recording every non-250 answer it got."""

    codes: Counter[int]

    def answer(self, seq: int, attempt: int, code: int, reply: bytes) -> str | None:
        with self.tally.lock:
            self.codes[code] += 1
        return super().answer(seq, attempt, code, reply)


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigterm_under_load_loses_nothing_and_sessions_finish_or_get_421(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'sekisho.db'}"
    with running_upstream() as upstream:
        gateway: GatewayProcess = write_config(tmp_path, store_url, upstream.port)
        tally = Tally()
        codes: Counter[int] = Counter()
        try:
            gateway.start()
            work: queue.Queue[int] = queue.Queue()
            for seq in range(RESTART_MESSAGES):
                work.put(seq)
            deadline = time.monotonic() + 60
            clients = []
            for _ in range(RESTART_CLIENTS):
                client = RecordingClient(gateway.smtp_port, work, tally, deadline)
                client.codes = codes
                clients.append(client)
                client.start()
            assert wait_until(lambda: tally.accepted() >= TERM_AFTER, 20)
            assert gateway.process is not None
            started = time.monotonic()
            gateway.process.send_signal(signal.SIGTERM)
            # Count from when the gateway has begun to drain, not from the kill: until
            # its loop runs the handler, sessions go on taking mail as before.
            draining = wait_until(lambda: "shutting down" in gateway.tail(), 10, step=0.002)
            accepted_at_term = tally.accepted()
            assert draining, gateway.tail()
            gateway.stop()  # waits for the exit (SIGKILL after 20 s)
            stop_seconds = time.monotonic() - started
            exit_code = gateway.process.returncode
            accepted_while_draining = tally.accepted() - accepted_at_term
            gateway.start()
            for client in clients:
                client.join(max(0.0, deadline - time.monotonic()))
            delivered = wait_until(lambda: _expected(tally) <= set(upstream.snapshot()), 20)
        finally:
            gateway.stop()
    received = upstream.snapshot()
    expected = {(seq, attempt, r) for seq, attempt in tally.queued for r in recipients(seq)}
    lost = expected - set(received)
    duplicates = sum(n - 1 for n in received.values() if n > 1)
    print(
        f"\nSIGTERM under load: sent={RESTART_MESSAGES} 250'd={len(tally.queued)} "
        f"(at SIGTERM {accepted_at_term}, while draining {accepted_while_draining}) "
        f"delivered={len(received)} duplicated={duplicates} "
        f"lost={len(lost)} stop took {stop_seconds:.1f}s, non-250 answers {dict(codes)}"
    )
    assert exit_code == 0, gateway.tail()
    assert stop_seconds < 15, "the drain waited for the full grace period"
    assert not tally.errors and not tally.refused and not tally.gave_up
    assert delivered and not lost, sorted(lost)[:10]
    # A graceful stop lets the claiming round and the sends in flight finish and be
    # recorded before it hands back its leases: nothing is sent twice.
    assert duplicates == 0, duplicates
    # In flight at SIGTERM: each client's transaction may finish (one each); the next
    # MAIL on those sessions is told 421, and nothing else but 250 or 421 is seen.
    assert accepted_while_draining <= RESTART_CLIENTS, accepted_while_draining
    assert codes[421] >= 1 and set(codes) <= {250, 421}, codes


def _expected(tally: Tally) -> set[tuple[int, int, str]]:
    with tally.lock:
        return {(seq, attempt, r) for seq, attempt in tally.queued for r in recipients(seq)}
