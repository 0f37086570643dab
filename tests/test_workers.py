"""`sekisho serve --workers N`: N gateway processes behind one SMTP port and one HTTP port.

Real processes on loopback: the supervisor is `python -m gateway serve --workers 2` on
a config whose ports are 0, so the ports the test talks to are the ones the parent
reserved and announced. Every test stops what it started, on success or failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from sqlalchemy.engine import make_url

from gateway.cli import main
from tests.test_crash_safety import PG_SKIP, PG_URL, _pg, message, running_upstream

START_TIMEOUT = 60.0  # two interpreters importing the gateway on a busy 2-core machine
STOP_TIMEOUT = 60.0
RESTART_WITHIN = 25.0  # the first back-off (0.5 s) and a start on a busy machine
T = TypeVar("T")
_LISTENING = re.compile(
    r"Sekisho listening: SMTP 127\.0\.0\.1:(\d+), HTTP 127\.0\.0\.1:(\d+), .*"
    r"(\d+) worker processes \(pids ([\d ]+)\)"
)
_WORKER = re.compile(r"worker (\d+) of \d+ \(pid (\d+)\) listening")


@pytest.fixture
def pg_store_url() -> Iterator[str]:
    if not PG_URL:
        pytest.skip(PG_SKIP)
    name = f"sekisho_workers_{secrets.token_hex(4)}"
    _pg(f'CREATE DATABASE "{name}"', PG_URL)
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', PG_URL)


def write_config(tmp_path: Path, store_url: str, upstream: str, audit: Path | None = None) -> Path:
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[smtp]
listen = "127.0.0.1:0"
hostname = "gateway.test"
trusted_networks = ["127.0.0.1/32"]
auth = "off"

[delivery]
upstream = "{upstream}"
starttls = "off"
timeout = "10s"
poll_interval = "100ms"
retry_initial = "200ms"
retry_max = "1s"

[store]
url = "{store_url}"

[admin]
listen = "127.0.0.1:0"

[audit]
path = "{audit or tmp_path / "audit.log"}"

[organization]
domains = ["example.com"]
""")
    return config


@dataclass
class Supervised:
    """`sekisho serve --workers N` as a subprocess, with what its log announced."""

    config: Path
    log: Path
    workers: int = 2
    process: subprocess.Popen[bytes] | None = None
    smtp_port: int = 0
    http_port: int = 0
    pids: list[int] = field(default_factory=list)

    def launch(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config),
                 "--workers", str(self.workers)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def start(self) -> None:
        self.launch()
        found = wait_until(lambda: _LISTENING.search(self.text()), START_TIMEOUT, self.exited)
        assert found, f"the workers did not all start:\n{self.tail()}"
        self.smtp_port, self.http_port = int(found.group(1)), int(found.group(2))
        assert int(found.group(3)) == self.workers
        self.pids = [int(p) for p in found.group(4).split()]

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def terminate(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(STOP_TIMEOUT)

    def cleanup(self) -> None:
        """Whatever happened in the test: nothing it started keeps running."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in self.worker_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def worker_pids(self) -> set[int]:
        return set(self.pids) | {int(m.group(2)) for m in _WORKER.finditer(self.text())}

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self) -> str:
        return self.text()[-4000:]


@contextlib.contextmanager
def supervised(config: Path, tmp_path: Path) -> Iterator[Supervised]:
    gateway = Supervised(config, tmp_path / "serve.log")
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.cleanup()


def wait_until(
    condition: Callable[[], T], timeout: float, give_up: Callable[[], bool] = lambda: False
) -> T | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if give_up():
            return condition() or None
        time.sleep(0.05)
    return None


def send(port: int, seq: int) -> str:
    """One message on its own connection (a new source port, so the kernel may pick
    either worker); returns the queue id from the 250 reply."""
    rcpt = f"rcpt{seq}@client.test"
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        client.ehlo("client.test")
        client.mail("app@example.com")
        client.rcpt(rcpt)
        code, reply = client.data(message(seq, 1, rcpt))
    assert code == 250, reply
    found = re.search(rb"queued as (\S+)", reply)
    assert found, reply
    return found.group(1).decode()


def audit_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def accepted_by(path: Path) -> dict[str, str]:
    """message id -> the audit instance of the worker that accepted it."""
    return {
        str(e["id"]): str(e["instance"])
        for e in audit_events(path)
        if e["event"] == "message.accepted"
    }


def _events(tmp_path: Path, name: str) -> int:
    return sum(1 for e in audit_events(tmp_path / "audit.log") if e["event"] == name)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_help_documents_workers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--workers N" in out and "SO_REUSEPORT" in out and "PostgreSQL" in out


def test_two_workers_on_an_in_memory_sqlite_store_are_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "sqlite:///:memory:", f"maildir:{tmp_path / 'out'}")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot start" in lines[0] and "--workers 2" in lines[0]
    assert "in-memory SQLite" in lines[0] and "sqlite:///" in lines[0]
    assert not (tmp_path / "audit.log").exists()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Both stores several processes can share: a SQLite file, a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sekisho.db'}"
    else:
        yield request.getfixturevalue("pg_store_url")


@pytest.mark.timeout(180)
def test_two_workers_share_one_port_deliver_each_message_once_and_stop_cleanly(
    tmp_path: Path, shared_store_url: str
) -> None:
    messages = 60
    with running_upstream() as upstream:
        config = write_config(tmp_path, shared_store_url, f"smtp://127.0.0.1:{upstream.port}")
        with supervised(config, tmp_path) as gateway:
            ids = [send(gateway.smtp_port, seq) for seq in range(messages)]
            delivered = wait_until(lambda: len(upstream.snapshot()) >= messages, 60)
            time.sleep(0.5)  # a duplicate send would arrive in this time
            received = upstream.snapshot()
            assert gateway.process is not None
            gateway.process.send_signal(signal.SIGHUP)
            reloaded = wait_until(lambda: _events(tmp_path, "config.reloaded") >= 2, 30)
            assert reloaded, f"SIGHUP did not reach both workers:\n{gateway.tail()}"
            code = gateway.terminate()
            assert code == 0, gateway.tail()
            assert not [pid for pid in gateway.pids if alive(pid)], "a worker outlived the stop"
    assert delivered, f"{len(received)} of {messages} delivered"
    assert sorted(seq for seq, _, _ in received) == list(range(messages))
    assert set(received.values()) == {1}, "a message was delivered twice"
    audit = tmp_path / "audit.log"
    instances = accepted_by(audit)
    assert set(ids) <= set(instances)
    workers = set(instances.values())
    assert len(workers) == 2 and {w[-3:] for w in workers} == {"-w1", "-w2"}, workers
    stopped = [e["instance"] for e in audit_events(audit) if e["event"] == "gateway.stopped"]
    assert sorted(map(str, stopped)) == sorted(workers)
    verify = subprocess.run(
        [sys.executable, "-m", "gateway", "audit", "verify", "--path", str(audit)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_a_killed_worker_is_restarted_and_the_port_keeps_answering(
    tmp_path: Path, pg_store_url: str
) -> None:
    config = write_config(tmp_path, pg_store_url, f"maildir:{tmp_path / 'out'}")
    with supervised(config, tmp_path) as gateway:
        victim = gateway.pids[0]
        os.kill(victim, signal.SIGKILL)
        reaped = wait_until(lambda: "exited unexpectedly with signal SIGKILL" in gateway.text(), 20)
        assert reaped, gateway.tail()

        def restarted() -> bool:
            pids = {int(m.group(2)) for m in _WORKER.finditer(gateway.text())}
            return bool(pids - set(gateway.pids))

        probes = 0
        deadline = time.monotonic() + RESTART_WITHIN
        while not restarted():
            # The survivor takes every connection while worker 1 is away.
            with socket.create_connection(("127.0.0.1", gateway.smtp_port), timeout=10) as conn:
                assert conn.recv(512).startswith(b"220"), "the port stopped answering"
            probes += 1
            assert not gateway.exited(), gateway.tail()
            assert time.monotonic() < deadline, f"worker 1 was not restarted:\n{gateway.tail()}"
            time.sleep(0.02)
        ids = [send(gateway.smtp_port, seq) for seq in range(40)]
        assert gateway.terminate() == 0, gateway.tail()
    assert probes > 0
    instances = accepted_by(tmp_path / "audit.log")
    assert {instances[i][-3:] for i in ids} == {"-w1", "-w2"}, "the restarted worker took no mail"


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_worker_that_keeps_failing_at_start_makes_serve_exit_non_zero(
    tmp_path: Path, pg_store_url: str
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("the audit log cannot be created under a file")
    config = write_config(
        tmp_path, pg_store_url, f"maildir:{tmp_path / 'out'}", audit=blocker / "audit.log"
    )
    gateway = Supervised(config, tmp_path / "serve.log")
    try:
        gateway.launch()
        assert gateway.process is not None
        code = gateway.process.wait(150)
    finally:
        gateway.cleanup()
    assert code != 0, gateway.tail()
    assert "failed to start 5 times in a row" in gateway.text(), gateway.tail()
    assert "restarting in" in gateway.text()
    assert not [pid for pid in gateway.worker_pids() if alive(pid)]
