"""Two instances on one PostgreSQL; one is SIGKILLed halfway. The other takes over the
dead one's leases when they expire, its clients fail over to the survivor (as behind a
TCP load balancer), and every message that got a 250 is delivered.

Duplicates can only come from recipients the dead instance had leased and possibly
sent but not yet recorded: at most its workers × recipients per message.
"""

from __future__ import annotations

import queue
import secrets
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.test_crash_safety import (
    CLIENT_TIMEOUT,
    CLIENTS,
    LEASE_SECONDS,
    PG_SKIP,
    PG_URL,
    RCPTS_PER_MESSAGE,
    WORKERS,
    Client,
    GatewayProcess,
    Tally,
    _pg,
    leased_at_kill,
    recipients,
    running_upstream,
    unfinished,
    wait_until,
    write_config,
)

MESSAGES = 2000
KILL_AFTER = 1000
DEADLINE = 75.0


class FailoverClient(Client):
    """Connects to the first instance that answers, starting with its own."""

    def __init__(
        self, ports: list[int], work: queue.Queue[int], tally: Tally, deadline: float
    ) -> None:
        super().__init__(ports[0], work, tally, deadline)
        self.ports = ports

    def connect(self) -> smtplib.SMTP:
        if self.smtp is None:
            for port in self.ports:
                try:
                    smtp = smtplib.SMTP(timeout=CLIENT_TIMEOUT)
                    smtp.connect("127.0.0.1", port)
                except OSError:
                    continue
                smtp.ehlo("client.test")
                self.smtp = smtp
                break
            else:
                raise OSError("no instance answers")
        return self.smtp


@pytest.fixture
def pg_store_url() -> Iterator[str]:
    if not PG_URL:
        pytest.skip(PG_SKIP)
    name = f"sekisho_scale_{secrets.token_hex(4)}"
    _pg(f'CREATE DATABASE "{name}"', PG_URL)
    try:
        yield make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', PG_URL)


def _instance(tmp_path: Path, name: str, store_url: str, upstream_port: int) -> GatewayProcess:
    folder = tmp_path / name
    folder.mkdir()
    gateway = write_config(folder, store_url, upstream_port)
    text = gateway.config.read_text().replace('path = "', f'instance = "{name}"\npath = "', 1)
    gateway.config.write_text(text)
    return gateway


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(150)
def test_two_instances_one_killed_every_accepted_message_is_delivered(
    tmp_path: Path, pg_store_url: str
) -> None:
    with running_upstream() as upstream:
        a = _instance(tmp_path, "gw-a", pg_store_url, upstream.port)
        b = _instance(tmp_path, "gw-b", pg_store_url, upstream.port)
        a.start()
        b.start()
        try:
            work: queue.Queue[int] = queue.Queue()
            for seq in range(MESSAGES):
                work.put(seq)
            tally = Tally()
            deadline = time.monotonic() + DEADLINE
            clients = [
                FailoverClient(
                    [a.smtp_port, b.smtp_port] if n % 2 else [b.smtp_port, a.smtp_port],
                    work,
                    tally,
                    deadline,
                )
                for n in range(CLIENTS)
            ]
            for client in clients:
                client.start()
            assert wait_until(lambda: tally.accepted() >= KILL_AFTER, 40), a.tail()
            a.kill()
            killed_at = time.monotonic()
            leased = leased_at_kill(pg_store_url)
            for client in clients:
                client.join(max(0.0, deadline - time.monotonic()))
            assert not any(c.is_alive() for c in clients), "clients still running"
            drained = wait_until(
                lambda: unfinished(pg_store_url) == 0, max(0.0, deadline - time.monotonic()), 0.2
            )
            took_over_after = time.monotonic() - killed_at
            time.sleep(0.3)
            received = upstream.snapshot()
        finally:
            a.stop()
            b.stop()
    acknowledged = {(seq, attempt, r) for (seq, attempt) in tally.queued for r in recipients(seq)}
    lost = sorted(acknowledged - set(received))
    dups = {key: n - 1 for key, n in received.items() if n > 1}
    print(
        f"\nscale-out: sent={MESSAGES} 250'd={len(tally.queued)} leased_at_kill={len(leased)} "
        f"delivered={len(received)} sends={sum(received.values())} "
        f"duplicates={sum(dups.values())} lost={len(lost)} "
        f"drained {took_over_after:.1f}s after the kill (lease {LEASE_SECONDS}s)"
    )
    assert drained, "recipients left undelivered"
    assert not tally.errors and not tally.refused and not tally.gave_up
    assert len({seq for seq, _ in tally.queued}) == MESSAGES
    assert not lost, f"{len(lost)} accepted messages never delivered: {lost[:10]}"
    assert not set(dups) - leased, "a message sent twice that the dead instance had not leased"
    assert sum(dups.values()) <= WORKERS * RCPTS_PER_MESSAGE, dups
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "audit",
            "verify",
            "--path",
            str(tmp_path / "gw-b" / "audit.log"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
