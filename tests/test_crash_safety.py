"""Crash safety: SIGKILL the gateway in the middle of a busy run and lose nothing.

The gateway runs as a real subprocess (`python -m gateway serve`) between ten
concurrent `smtplib` clients and an aiosmtpd upstream that is slow enough (5 ms per
DATA) for deliveries to be genuinely in flight. After about half of 500 messages
are accepted, the gateway is killed with SIGKILL and restarted on the same store.
Clients whose transaction died with it retry, as any SMTP client would.

Every message carries `X-Test-Seq` (which of the 500 it is) and `X-Test-Attempt`
(which submission of it). The pair identifies one accepted message, so a
delivery duplicate (the same accepted message sent twice by the gateway) is told
apart from an intake duplicate (a client re-submitting a message whose 250 was lost
in the kill, which SMTP allows and no gateway can prevent).

What must hold:

- every (seq, attempt) that got `250 … queued as <id>` reaches the upstream;
- delivery duplicates only come from recipients leased by the killed instance and
  not yet recorded: each of them must be one of the recipients that the store shows
  under a lease of the dead instance right after the kill; and there are at most
  `workers × recipients per message` of them, because a delivery task holds one of
  the `[delivery] workers` slots from before it sends until the outcome is committed,
  and one task sends one message to the recipients of one domain;
- the audit log still verifies after the kill, and it records every accepted id;
- intake duplicates are at most one per client: a client has one transaction in
  flight at a time, so only that one can have been committed without its 250.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import secrets
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy.engine import make_url

PG_URL = os.environ.get("SEKISHO_TEST_PG_URL")
PG_SKIP = (
    "PostgreSQL run needs SEKISHO_TEST_PG_URL (e.g. postgresql://postgres@127.0.0.1:5432/test)"
)

MESSAGES = 500
CLIENTS = 10
KILL_AFTER = 250  # accepted messages before the SIGKILL
WORKERS = 4  # [delivery] workers
RCPTS_PER_MESSAGE = 1
LEASE_SECONDS = 4  # the restarted instance takes over the dead one's leases after this
UPSTREAM_DELAY = 0.005  # seconds per DATA at the upstream, so sends are in flight
MAX_ATTEMPTS = 30  # per message; retries back off up to 1 s, so this outlasts a restart
CLIENT_TIMEOUT = 10.0  # smtplib socket timeout
START_TIMEOUT = 20.0
RUN_DEADLINE = 45.0  # the whole scenario, from the first message to the last delivery

Key = tuple[int, int, str]  # (seq, attempt, recipient)
_MARK = re.compile(rb"^X-Test-Seq: (\d+)\r?\nX-Test-Attempt: (\d+)\r?$", re.MULTILINE)


def _marks(data: bytes) -> tuple[int, int]:
    match = _MARK.search(data)
    assert match is not None, "a message without the test's headers reached the upstream"
    return int(match.group(1)), int(match.group(2))


# --- the upstream: aiosmtpd on its own loop in a thread -------------------------------------


@dataclass
class CountingUpstream:
    delay: float = UPSTREAM_DELAY
    port: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    received: Counter[Key] = field(default_factory=Counter)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        seq, attempt = _marks(bytes(envelope.original_content or b""))
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.received[(seq, attempt, rcpt)] += 1
        return "250 2.0.0 Ok: upstream queued"

    def snapshot(self) -> Counter[Key]:
        with self.lock:
            return Counter(self.received)


@contextlib.contextmanager
def running_upstream() -> Iterator[CountingUpstream]:
    upstream = CountingUpstream()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    servers: list[asyncio.Server] = []

    async def start() -> None:
        server = await loop.create_server(
            lambda: SMTP(upstream, hostname="upstream.test", decode_data=False), "127.0.0.1", 0
        )
        upstream.port = server.sockets[0].getsockname()[1]
        servers.append(server)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()
        for server in servers:
            server.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()

    thread = threading.Thread(target=run, name="upstream", daemon=True)
    thread.start()
    assert ready.wait(10), "the upstream did not start"
    try:
        yield upstream
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


# --- the store: a fresh SQLite file or a fresh PostgreSQL database --------------------------


def _pg(sql: str, url: str) -> list[Any]:
    import asyncpg

    async def run() -> list[Any]:
        connection = await asyncpg.connect(_plain(url), timeout=10)
        try:
            return list(await connection.fetch(sql))
        finally:
            await connection.close()

    return asyncio.run(run())


def _plain(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def query(store_url: str, sql: str) -> list[tuple[Any, ...]]:
    """A read from the test's side, while the gateway is dead or running."""
    if store_url.startswith("sqlite"):
        path = make_url(store_url).database
        assert path
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as connection:
            return list(connection.execute(sql).fetchall())
    return [tuple(row) for row in _pg(sql, store_url)]


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param(
            "postgresql",
            marks=[pytest.mark.postgres, pytest.mark.skipif(not PG_URL, reason=PG_SKIP)],
        ),
    ]
)
def crash_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sekisho.db'}"
        return
    assert PG_URL is not None
    name = f"sekisho_crash_{secrets.token_hex(4)}"
    _pg(f'CREATE DATABASE "{name}"', PG_URL)
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', PG_URL)


# --- the gateway as a subprocess ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class GatewayProcess:
    config: Path
    smtp_port: int
    http_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"the gateway exited with {self.process.returncode}:\n{self.tail()}")
            if self._healthy():
                return
            time.sleep(0.05)
        pytest.fail(f"the gateway was not ready within {START_TIMEOUT}s:\n{self.tail()}")

    def _healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.http_port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status != 200:
                    return False
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2) as sock:
                return sock.recv(512).startswith(b"220")
        except OSError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def write_config(tmp_path: Path, store_url: str, upstream_port: int) -> GatewayProcess:
    smtp_port, http_port = free_port(), free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[smtp]
listen = "127.0.0.1:{smtp_port}"
hostname = "gateway.test"
trusted_networks = ["127.0.0.1/32"]
auth = "off"

[delivery]
upstream = "smtp://127.0.0.1:{upstream_port}"
starttls = "off"
workers = {WORKERS}
connections = {WORKERS}
timeout = "10s"
poll_interval = "100ms"
retry_initial = "200ms"
retry_max = "1s"
lease = "{LEASE_SECONDS}s"

[store]
url = "{store_url}"

[admin]
listen = "127.0.0.1:{http_port}"

[audit]
path = "{tmp_path / "audit.log"}"

[organization]
domains = ["example.com"]
""")
    return GatewayProcess(config, smtp_port, http_port, tmp_path / "gateway.log")


# --- the clients ----------------------------------------------------------------------------


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    queued: dict[tuple[int, int], str] = field(default_factory=dict)  # (seq, attempt) -> id
    attempts: int = 0
    failed_attempts: int = 0
    refused: list[tuple[int, int, str]] = field(default_factory=list)
    gave_up: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def accepted(self) -> int:
        with self.lock:
            return len(self.queued)


def message(seq: int, attempt: int, rcpt: str) -> bytes:
    return (
        f"From: app@example.com\r\nTo: {rcpt}\r\nSubject: crash safety {seq}\r\n"
        f"Message-ID: <crash-{seq}-{attempt}@example.com>\r\n"
        f"X-Test-Seq: {seq}\r\nX-Test-Attempt: {attempt}\r\n\r\n"
        + f"Message {seq}, attempt {attempt}.\r\n"
        * 20
    ).encode()


def recipients(seq: int) -> list[str]:
    return [f"rcpt{seq}-{n}@client{n}.test" for n in range(RCPTS_PER_MESSAGE)]


class Client(threading.Thread):
    """Sends its share of messages over one session, reconnecting and retrying a
    message whose transaction failed, as a mail client would."""

    def __init__(self, port: int, work: queue.Queue[int], tally: Tally, deadline: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.work = work
        self.tally = tally
        self.deadline = deadline
        self.smtp: smtplib.SMTP | None = None

    def run(self) -> None:
        try:
            while time.monotonic() < self.deadline:
                try:
                    seq = self.work.get_nowait()
                except queue.Empty:
                    return
                self.submit(seq)
        except Exception as error:  # reported by the test, never swallowed
            with self.tally.lock:
                self.tally.errors.append(repr(error))
        finally:
            self.close()

    def submit(self, seq: int) -> None:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if time.monotonic() >= self.deadline:
                break
            with self.tally.lock:
                self.tally.attempts += 1
            outcome = self.try_once(seq, attempt)
            if outcome is not None:
                return
            with self.tally.lock:
                self.tally.failed_attempts += 1
            time.sleep(min(0.1 * attempt, 1.0))
        with self.tally.lock:
            self.tally.gave_up.append(seq)

    def try_once(self, seq: int, attempt: int) -> str | None:
        """None: no final answer (retry). Otherwise the reply text."""
        rcpts = recipients(seq)
        try:
            smtp = self.connect()
            code, reply = smtp.mail("app@example.com")
            if code != 250:
                return self.answer(seq, attempt, code, reply)
            for rcpt in rcpts:
                code, reply = smtp.rcpt(rcpt)
                if code != 250:
                    return self.answer(seq, attempt, code, reply)
            code, reply = smtp.data(message(seq, attempt, rcpts[0]))
            return self.answer(seq, attempt, code, reply)
        except (OSError, smtplib.SMTPException):
            self.close()
            return None

    def answer(self, seq: int, attempt: int, code: int, reply: bytes) -> str | None:
        text = reply.decode(errors="replace")
        if code == 250:
            match = re.fullmatch(r"2\.0\.0 Ok: queued as (\S+)", text)
            assert match, f"250 without a queue id: {text!r}"
            with self.tally.lock:
                self.tally.queued[(seq, attempt)] = match.group(1)
            return text
        if self.smtp is not None:
            with contextlib.suppress(OSError, smtplib.SMTPException):
                self.smtp.rset()
        if 400 <= code < 500:
            return None
        with self.tally.lock:
            self.tally.refused.append((seq, code, text))
        return text

    def connect(self) -> smtplib.SMTP:
        if self.smtp is None:
            smtp = smtplib.SMTP(timeout=CLIENT_TIMEOUT)
            smtp.connect("127.0.0.1", self.port)
            self.smtp = smtp
            smtp.ehlo("client.test")
        return self.smtp

    def close(self) -> None:
        if self.smtp is not None:
            with contextlib.suppress(Exception):
                self.smtp.close()
            self.smtp = None


# --- the scenario ---------------------------------------------------------------------------


def wait_until(condition: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


def leased_at_kill(store_url: str) -> set[Key]:
    """Recipients still due and under a lease: those the dead instance had claimed."""
    rows = query(
        store_url,
        """
        SELECT r.address, b.raw FROM recipients r JOIN bodies b ON b.message_id = r.message_id
        WHERE r.lease_owner IS NOT NULL AND r.state IN ('queued', 'deferred')""",
    )
    return {(*_marks(bytes(raw)), address) for address, raw in rows}


def unfinished(store_url: str) -> int:
    rows = query(
        store_url,
        "SELECT count(*) FROM recipients WHERE state NOT IN ('delivered', 'bounced', 'cancelled')",
    )
    return int(rows[0][0])


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_sigkill_mid_run_loses_no_accepted_message(tmp_path: Path, crash_store_url: str) -> None:
    with running_upstream() as upstream:
        gateway = write_config(tmp_path, crash_store_url, upstream.port)
        try:
            gateway.start()
            figures = run_scenario(gateway, upstream, crash_store_url)
        finally:
            gateway.stop()
    check(figures)
    check_audit(gateway, figures.tally)


@dataclass
class Figures:
    tally: Tally
    received: Counter[Key]
    leased: set[Key]
    accepted_at_kill: int
    delivered_at_kill: int
    unfinished_after: int


def run_scenario(gateway: GatewayProcess, upstream: CountingUpstream, store_url: str) -> Figures:
    started = time.monotonic()
    deadline = started + RUN_DEADLINE
    work: queue.Queue[int] = queue.Queue()
    for seq in range(MESSAGES):
        work.put(seq)
    tally = Tally()
    clients = [Client(gateway.smtp_port, work, tally, deadline) for _ in range(CLIENTS)]
    for client in clients:
        client.start()

    assert wait_until(lambda: tally.accepted() >= KILL_AFTER, 20), (
        f"only {tally.accepted()} accepted before the kill was due:\n{gateway.tail()}"
    )
    gateway.kill()
    accepted_at_kill = tally.accepted()
    delivered_at_kill = sum(upstream.snapshot().values())
    leased = leased_at_kill(store_url)
    gateway.start()

    for client in clients:
        client.join(max(0.0, deadline - time.monotonic()))
    assert not any(c.is_alive() for c in clients), "clients still running at the deadline"
    wait_until(lambda: unfinished(store_url) == 0, max(0.0, deadline - time.monotonic()), 0.2)
    # Whatever is still being recorded settles before counting: nothing is due any more.
    time.sleep(0.3)
    return Figures(
        tally,
        upstream.snapshot(),
        leased,
        accepted_at_kill,
        delivered_at_kill,
        unfinished(store_url),
    )


def check(f: Figures) -> None:
    tally = f.tally
    acknowledged = {
        (seq, attempt, rcpt) for (seq, attempt) in tally.queued for rcpt in recipients(seq)
    }
    lost = sorted(acknowledged - set(f.received))
    unexpected = sorted(
        k for k in f.received if not (0 <= k[0] < MESSAGES and k[2] in recipients(k[0]))
    )
    delivery_dups = {key: n - 1 for key, n in f.received.items() if n > 1}
    seqs_delivered: dict[int, set[int]] = {}
    for seq, attempt, _rcpt in f.received:
        seqs_delivered.setdefault(seq, set()).add(attempt)
    intake_dups = sum(len(attempts) - 1 for attempts in seqs_delivered.values())
    print(
        f"\ncrash safety: sent={MESSAGES} attempts={tally.attempts} "
        f"failed_attempts={tally.failed_attempts} 250'd={len(tally.queued)} "
        f"(at kill {f.accepted_at_kill}, delivered then {f.delivered_at_kill}, "
        f"leased then {len(f.leased)}) delivered={len(f.received)} "
        f"sends={sum(f.received.values())} delivery_duplicates={sum(delivery_dups.values())} "
        f"intake_duplicates={intake_dups} lost={len(lost)} unfinished={f.unfinished_after}"
    )

    assert not tally.errors, tally.errors
    assert not tally.refused, f"the gateway refused messages: {tally.refused[:5]}"
    assert not tally.gave_up, f"messages never accepted: {sorted(tally.gave_up)[:20]}"
    assert len({seq for seq, _ in tally.queued}) == MESSAGES
    assert not unexpected, unexpected[:5]
    assert not lost, f"{len(lost)} accepted messages never delivered: {lost[:10]}"
    assert f.unfinished_after == 0
    unleased = sorted(set(delivery_dups) - f.leased)
    assert not unleased, f"sent twice without being leased at the kill: {unleased[:10]}"
    assert sum(delivery_dups.values()) <= WORKERS * RCPTS_PER_MESSAGE, delivery_dups
    assert intake_dups <= CLIENTS, intake_dups


def check_audit(gateway: GatewayProcess, tally: Tally) -> None:
    """The hash chain survives a SIGKILL, and every 250 has its `message.accepted` line
    (it is written and flushed before the reply)."""
    verify = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", "--config", str(gateway.config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    lines = gateway.config.with_name("audit.log").read_text().splitlines()
    accepted = {
        entry.get("id")
        for entry in map(json.loads, lines)
        if entry.get("event") == "message.accepted"
    }
    missing = sorted(set(tally.queued.values()) - accepted)
    assert not missing, f"accepted without an audit line: {missing[:10]}"
