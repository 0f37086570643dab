"""Relay benchmark: Postfix's `smtp-source` through the gateway into `smtp-sink`.

    python bench/relay.py [--messages 2000] [--sessions 20] [--size 5120]
                          [--store-url sqlite|postgresql://user@host:port/db]
                          [--processes N]

Prints the accepted rate (every DATA answered 250 by the gateway, as timed by
smtp-source's run) and the end-to-end rate (until smtp-sink has counted every
message). The gateway runs as a subprocess with a durable store (SQLite in a temp
dir, WAL with synchronous=FULL; or a fresh database created on the given PostgreSQL
server and dropped afterwards) on free loopback ports; `--processes N` runs it as
`serve --workers N` (N gateway processes on the same ports and store). The CPU
figure is the gateway's whole process tree. Everything it starts is stopped and every
temp file removed, on success or failure.

This is a benchmark, not a test: it fails only when the run itself is broken
(a message refused or never delivered).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
_MESG = re.compile(rb"mesg=(\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Sink:
    """smtp-sink with its running counter (-c) read as it goes: `mesg=N` is updated
    each time a "." is received."""

    port: int
    target: int
    process: subprocess.Popen[bytes] | None = None
    count: int = 0
    done_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        user = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        self.process = subprocess.Popen(
            [SMTP_SINK, *user, "-c", f"{HOST}:{self.port}", "256"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        threading.Thread(target=self._read, name="sink-counter", daemon=True).start()
        wait_for(lambda: _smtp_banner(self.port), START_TIMEOUT, "smtp-sink did not start")

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        while chunk := os.read(self.process.stdout.fileno(), 65536):
            counts = _MESG.findall(chunk)
            if counts:
                self.count = int(counts[-1])
                if self.count >= self.target and self.done_at is None:
                    self.done_at = time.monotonic()
                    self.done.set()

    def stop(self) -> None:
        _terminate(self.process)


@dataclass
class GatewayProcess:
    config: Path
    smtp_port: int
    http_port: int
    log: Path
    processes: int = 1
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(self.config),
                    "--workers",
                    str(self.processes),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_for(self._ready, START_TIMEOUT, "the gateway did not start")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise SystemExit(f"the gateway exited with {self.process.returncode}:\n{self.tail()}")
        if self.processes > 1 and "Sekisho listening" not in self.tail():
            return False  # the supervisor says so once every worker is up
        try:
            url = f"http://{HOST}:{self.http_port}/healthz"
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status != 200:
                    return False
        except OSError:
            return False
        return _smtp_banner(self.smtp_port)

    def stop(self) -> None:
        _terminate(self.process, signal.SIGTERM, grace=70 if self.processes > 1 else 15)

    def cpu_seconds(self) -> float:
        """User + system CPU of the gateway and its worker processes so far (Linux /proc)."""
        assert self.process is not None
        stats = proc_stats()
        if self.process.pid not in stats:
            return float("nan")
        return sum(
            cpu
            for pid, (ppid, cpu) in stats.items()
            if pid == self.process.pid or ppid == self.process.pid
        )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process we can read."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        stats[int(entry.name)] = (int(fields[1]), cpu)
    return stats


def _smtp_banner(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            return sock.recv(512).startswith(b"220")
    except OSError:
        return False


def _terminate(
    process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace: float = 5
) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def wait_for(condition: Callable[[], bool], timeout: float, failure: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise SystemExit(failure)


# --- the store: a temp SQLite file, or a fresh database on a PostgreSQL server ------------


def _pg(server_url: str, sql: str) -> None:
    import asyncpg
    from sqlalchemy.engine import make_url

    async def run() -> None:
        url = make_url(server_url).set(drivername="postgresql")
        connection = await asyncpg.connect(url.render_as_string(hide_password=False), timeout=10)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run())


@contextlib.contextmanager
def store(url: str, tmp: Path) -> Iterator[str]:
    if url == "sqlite":
        yield f"sqlite:///{tmp / 'sekisho.db'}"
        return
    from sqlalchemy.engine import make_url

    if not url.startswith(("postgresql", "postgres")):
        raise SystemExit(f"--store-url: 'sqlite' or a postgresql:// URL, not {url!r}")
    name = f"sekisho_bench_{secrets.token_hex(4)}"
    _pg(url, f'CREATE DATABASE "{name}"')
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        _pg(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_config(
    tmp: Path, store_url: str, sink_port: int, workers: int | None, processes: int = 1
) -> GatewayProcess:
    smtp_port, http_port = free_port(), free_port()
    config = tmp / "gateway.toml"
    config.write_text(f"""
[smtp]
listen = "{HOST}:{smtp_port}"
hostname = "gateway.bench"
trusted_networks = ["127.0.0.1/32"]
auth = "off"
max_connections = 500

[delivery]
upstream = "smtp://{HOST}:{sink_port}"
starttls = "off"
{f"workers = {workers}" if workers else ""}
{f"connections = {workers}" if workers else ""}
poll_interval = "100ms"
retry_initial = "200ms"

[store]
url = "{store_url}"

[admin]
listen = "{HOST}:{http_port}"

[audit]
path = "{tmp / "audit.log"}"

[organization]
domains = ["example.com"]
""")
    return GatewayProcess(config, smtp_port, http_port, tmp / "gateway.log", processes)


def audit_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            event = json.loads(line).get("event", "?")
            counts[event] = counts.get(event, 0) + 1
    return counts


# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, tmp: Path) -> int:
    sink = Sink(free_port(), args.messages)
    with store(args.store_url, tmp) as store_url:
        gateway = write_config(tmp, store_url, sink.port, args.workers, args.processes)
        try:
            sink.start()
            gateway.start()
            status = measure(args, gateway, sink)
        finally:
            gateway.stop()
            sink.stop()
    # Read once the gateway has stopped: outcomes recorded after the sink's count are in.
    events = audit_counts(tmp / "audit.log")
    print(f"audit: {json.dumps(events, sort_keys=True)}")
    return status


def smtp_source_command(
    args: argparse.Namespace, port: int, mail_from: str, rcpt: str, *, reuse: bool = False
) -> list[str]:
    """smtp-source with the load of `args` (--sessions, --messages, --size) to `port`."""
    return [
        SMTP_SOURCE,
        *("-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size)),
        *("-f", mail_from, "-t", rcpt),
        *(["-d"] if reuse else []),
        f"{HOST}:{port}",
    ]


def measure(args: argparse.Namespace, gateway: GatewayProcess, sink: Sink) -> int:
    command = smtp_source_command(
        args, gateway.smtp_port, "bench@example.com", "rcpt@client.example", reuse=args.reuse
    )
    print("$", " ".join(command), flush=True)
    cpu_before = gateway.cpu_seconds()
    started = time.monotonic()
    source = subprocess.run(
        command, capture_output=True, text=True, timeout=args.timeout, check=False
    )
    accepted_s = time.monotonic() - started
    remaining = max(1.0, args.timeout - accepted_s)
    sink.done.wait(remaining)
    end_to_end_s = (sink.done_at or time.monotonic()) - started
    cpu = gateway.cpu_seconds() - cpu_before
    load = os.getloadavg()[0]

    events = audit_counts(gateway.config.with_name("audit.log"))
    accepted = events.get("message.accepted", 0)
    print(
        f"messages={args.messages} sessions={args.sessions} size={args.size} "
        f"store={args.store_url.split(':', 1)[0]} workers={args.workers or 'shipped (20)'} "
        f"processes={args.processes}"
    )
    print(
        f"accepted:   {accepted}/{args.messages} in {accepted_s:.2f} s "
        f"= {accepted / accepted_s:.0f} msg/s"
    )
    print(
        f"end-to-end: {sink.count}/{args.messages} at the sink in {end_to_end_s:.2f} s "
        f"= {sink.count / end_to_end_s:.0f} msg/s"
    )
    print(
        f"gateway CPU: {cpu:.1f} s over {end_to_end_s:.1f} s wall "
        f"({100 * cpu / end_to_end_s:.0f}% of one core; {os.cpu_count()} cores, "
        f"load average {load:.1f})"
    )
    problems = []
    if source.returncode != 0 or source.stderr.strip():
        problems.append(f"smtp-source exited {source.returncode}: {source.stderr.strip()[-500:]}")
    if accepted != args.messages:
        problems.append(f"the gateway accepted {accepted} of {args.messages}")
    if sink.count < args.messages:
        problems.append(f"the sink has {sink.count} of {args.messages} after {args.timeout} s")
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if problems:
        print(gateway.tail(), file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--size", type=int, default=5120, help="message size in bytes")
    parser.add_argument(
        "--store-url",
        default="sqlite",
        help="'sqlite' (a temp file) or a PostgreSQL server URL, on which "
        "a fresh database is created and dropped",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="[delivery] workers and connections (default: the shipped 20)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="gateway processes: `serve --workers N` (each has its own [delivery] workers)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="smtp-source -d: several messages per session"
    )
    parser.add_argument(
        "--timeout", type=float, default=150.0, help="seconds allowed for the whole relay"
    )
    args = parser.parse_args(argv)
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if not Path(tool).exists():
            parser.error(f"{tool} not found: apt-get install postfix")
    tmp = Path(tempfile.mkdtemp(prefix="sekisho-bench-"))
    try:
        return run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
