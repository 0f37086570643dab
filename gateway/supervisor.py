"""`sekisho serve --workers N`: N gateway processes on the same SMTP and HTTP ports.

One gateway is one event loop, so it uses one core. The store is already shared
safely between instances (leases; on PostgreSQL SKIP LOCKED, on SQLite one writer
at a time across processes through the writer lock file, see quarantine.db; one
audit chain per instance), so the parent here only has to start N full gateways on
one machine:

- it checks the config and the schema once, then reserves the SMTP and admin ports:
  a socket bound with SO_REUSEPORT and never listened on. It takes no connections,
  but it pins the port number (port 0 in the config becomes a real port that every
  child is told) and keeps the port ours while a child restarts;
- each child is `sekisho serve --worker I` (a fresh interpreter, not a fork of this
  one), a whole Gateway whose listeners join the same SO_REUSEPORT group, so the
  kernel spreads new connections across the children. Its audit chain is
  `<instance>-wI`;
- the parent runs no event loop. It waits in select() on a signal wake-up pipe and
  one socketpair per child: the child writes "ready" on it once it listens, and
  reads EOF from it if the parent dies, which makes it drain and exit instead of
  serving on as an orphan.

SIGTERM or SIGINT stops every child (each drains as a lone gateway does) and the
parent exits 0 once all have stopped cleanly. SIGHUP is forwarded (rule reload). A
child that dies otherwise is restarted after a back-off that doubles while it keeps
dying; one that dies before it is ready MAX_START_FAILURES times in a row makes the
parent stop the others and exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from gateway.app import Gateway, StartupError, audit_instance, check_schema, run_gateway
from gateway.config import Config, Endpoint
from quarantine.db import Store, sqlite_file

log = logging.getLogger(__name__)

RESTART_INITIAL = 0.5  # seconds before the first restart of a child that died
RESTART_MAX = 30.0  # the back-off doubles up to this while a child keeps dying
STABLE_AFTER = 60.0  # a child that ran this long since ready starts its back-off afresh
MAX_START_FAILURES = 5  # exits before "ready" in a row, then the parent gives up
STOP_GRACE = 60.0  # a child drains sessions (30 s) and sends (10 s); then SIGKILL
READY = b"ready\n"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


def refuse_store(config: Config, workers: int) -> str | None:
    """Why N > 1 workers cannot share this store, in one line; None when they can."""
    if workers <= 1 or not config.store.url.startswith("sqlite"):
        return None
    if sqlite_file(config.store.url) is not None:
        return None
    return (
        f"--workers {workers} needs a store the processes can share, and an in-memory "
        "SQLite database lives inside one process: set [store].url to a file "
        "(sqlite:///var/sekisho.db) or a postgresql:// URL"
    )


# -- the parent ------------------------------------------------------------------------


@dataclass
class Child:
    index: int
    process: subprocess.Popen[bytes] | None = None
    link: socket.socket | None = None
    started_at: float = 0.0
    ready: bool = False
    failures: int = 0  # unexpected exits in a row: sets the back-off
    start_failures: int = 0  # exits before ready in a row: gives up at MAX_START_FAILURES
    restart_at: float | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


@dataclass
class Supervisor:
    config_path: Path
    config: Config
    workers: int
    smtp_port: int
    http_port: int
    children: list[Child] = field(default_factory=list)
    stopping: bool = False
    failed: bool = False
    announced: bool = False
    stop_deadline: float = 0.0

    def run(self) -> int:
        wake = _signal_pipe()
        self.children = [Child(i) for i in range(1, self.workers + 1)]
        for child in self.children:
            self._spawn(child)
        try:
            while not self._finished():
                self._step(wake)
        finally:
            self._kill_all()
            signal.set_wakeup_fd(-1)
            os.close(wake)
        return self._exit_code()

    def _step(self, wake: int) -> None:
        links = {c.link.fileno(): c for c in self.children if c.link is not None}
        readable, _, _ = select.select([wake, *links], [], [], self._timeout())
        if wake in readable:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                for signum in os.read(wake, 512):
                    self._on_signal(signum)
        for fd in readable:
            if fd in links:
                self._on_link(links[fd])
        self._reap()
        self._restart_due()
        if self.stopping and time.monotonic() > self.stop_deadline:
            log.error("workers still running %.0f s after the stop: killing them", STOP_GRACE)
            self.failed = True
            self._kill_all()

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [c.restart_at - now for c in self.children if c.restart_at is not None]
        return max(0.0, min([1.0, *due]))

    def _on_signal(self, signum: int) -> None:
        match signum:
            case signal.SIGTERM | signal.SIGINT:
                self._stop(f"got {signal.Signals(signum).name}")
            case signal.SIGHUP:
                live = self._send(signal.SIGHUP)
                log.info("SIGHUP: asked %d workers to reload the rules", live)
            case _:  # SIGCHLD: _reap runs after every wake-up
                pass

    def _on_link(self, child: Child) -> None:
        assert child.link is not None
        try:
            data = child.link.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data.startswith(READY.strip()):
            child.ready = True
            child.start_failures = 0
            self._announce()
        elif not data:  # the child is gone; _reap tells how
            self._close_link(child)

    def _announce(self) -> None:
        if self.announced or not all(c.ready for c in self.children):
            return
        self.announced = True
        admin = self.config.admin.listen
        log.info(
            "Sekisho listening: SMTP %s:%d, HTTP %s, delivering to %s, %d worker processes "
            "(pids %s)",
            self.config.smtp.listen.host,
            self.smtp_port,
            f"{admin.host}:{self.http_port}" if admin else "off",
            self.config.delivery.upstream,
            self.workers,
            " ".join(str(c.process.pid) for c in self.children if c.process),
        )

    def _reap(self) -> None:
        for child in self.children:
            if child.process is None or child.process.poll() is None:
                continue
            code = child.process.returncode
            process, child.process = child.process, None
            self._close_link(child)
            if self.stopping:
                if code != 0:
                    log.error(
                        "worker %d (pid %d) stopped with %s",
                        child.index,
                        process.pid,
                        _describe(code),
                    )
                    self.failed = True
                continue
            self._schedule_restart(child, process.pid, code)

    def _schedule_restart(self, child: Child, pid: int, code: int) -> None:
        now = time.monotonic()
        if child.ready and now - child.started_at >= STABLE_AFTER:
            child.failures = 0
        child.failures += 1
        if not child.ready:
            child.start_failures += 1
        if child.start_failures >= MAX_START_FAILURES:
            log.error(
                "worker %d failed to start %d times in a row (last: %s); giving up",
                child.index,
                child.start_failures,
                _describe(code),
            )
            self.failed = True
            self._stop("a worker cannot start")
            return
        delay = min(RESTART_MAX, RESTART_INITIAL * 2 ** (child.failures - 1))
        log.error(
            "worker %d (pid %d) exited unexpectedly with %s%s; restarting in %.1f s",
            child.index,
            pid,
            _describe(code),
            "" if child.ready else " before it was ready",
            delay,
        )
        child.ready = False
        child.restart_at = now + delay

    def _restart_due(self) -> None:
        now = time.monotonic()
        for child in self.children:
            if not self.stopping and child.restart_at is not None and child.restart_at <= now:
                self._spawn(child)

    def _spawn(self, child: Child) -> None:
        parent_end, child_end = socket.socketpair()
        parent_end.setblocking(False)
        command = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(self.config_path),
            "--workers",
            str(self.workers),
            "--worker",
            str(child.index),
            "--smtp-port",
            str(self.smtp_port),
            "--http-port",
            str(self.http_port),
            "--supervisor-fd",
            str(child_end.fileno()),
        ]
        try:
            child.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, pass_fds=(child_end.fileno(),)
            )
        finally:
            child_end.close()
        child.link = parent_end
        child.started_at = time.monotonic()
        child.ready = False
        child.restart_at = None

    def _stop(self, why: str) -> None:
        if self.stopping:
            self._send(signal.SIGTERM)
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + STOP_GRACE
        for child in self.children:
            child.restart_at = None
        live = self._send(signal.SIGTERM)
        log.info("%s: stopping %d workers (each finishes its sessions and sends)", why, live)

    def _send(self, signum: int) -> int:
        live = 0
        for child in self.children:
            if child.process is not None and child.running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signum)
                    live += 1
        return live

    def _finished(self) -> bool:
        return self.stopping and not any(c.process is not None for c in self.children)

    def _kill_all(self) -> None:
        for child in self.children:
            if child.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                child.process.wait()
                child.process = None
            self._close_link(child)

    @staticmethod
    def _close_link(child: Child) -> None:
        if child.link is not None:
            child.link.close()
            child.link = None

    def _exit_code(self) -> int:
        if self.failed:
            return 1
        log.info("all %d workers stopped", self.workers)
        return 0


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _signal_pipe() -> int:
    """Signals arrive as bytes on a pipe that select() watches (signal.set_wakeup_fd)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    os.set_blocking(read_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def note(_signum: int, _frame: FrameType | None) -> None:
        """The number is already on the pipe; a Python handler is needed for that."""

    for signum in FORWARDED:
        signal.signal(signum, note)
    return read_end


def reserve(endpoint: Endpoint) -> socket.socket:
    """Bind (not listen) with SO_REUSEPORT: the port is ours, connections go to children."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((endpoint.host, endpoint.port))
    except OSError as error:
        sock.close()
        reason = error.strerror or str(error)
        raise StartupError(f"cannot listen on {endpoint}: {reason}") from None
    if _answers(endpoint.host, sock.getsockname()[1]):
        # Another server of ours (same user, SO_REUSEPORT) already listens there; joining
        # its group would split its traffic with us without anyone noticing.
        sock.close()
        raise StartupError(f"cannot listen on {endpoint}: {errno.errorcode[errno.EADDRINUSE]}")
    return sock


def _answers(host: str, port: int) -> bool:
    target = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


async def _prepare_store(config: Config) -> None:
    store = Store(config.store.url)
    try:
        await check_schema(store)
    finally:
        await store.close()


def supervise(config_path: Path, config: Config, workers: int) -> int:
    """Check once, reserve the ports, run `workers` children until stopped."""
    asyncio.run(_prepare_store(config))
    reserved = [reserve(config.smtp.listen)]
    admin = config.admin.listen
    if admin is not None:
        reserved.append(reserve(admin))
    try:
        ports = [s.getsockname()[1] for s in reserved]
        supervisor = Supervisor(
            config_path.resolve(),
            config,
            workers,
            smtp_port=ports[0],
            http_port=ports[1] if admin is not None else 0,
        )
        return supervisor.run()
    finally:
        for sock in reserved:
            sock.close()


# -- a child -----------------------------------------------------------------------------


def worker_config(config: Config, index: int, smtp_port: int, http_port: int) -> Config:
    """The parent's config with the reserved ports and this worker's own audit chain."""
    smtp = config.smtp.model_copy(update={"listen": Endpoint(config.smtp.listen.host, smtp_port)})
    admin = config.admin
    if admin.listen is not None:
        admin = admin.model_copy(update={"listen": Endpoint(admin.listen.host, http_port)})
    config = config.model_copy(update={"smtp": smtp, "admin": admin})
    audit = config.audit.model_copy(update={"instance": f"{audit_instance(config)}-w{index}"})
    return config.model_copy(update={"audit": audit})


async def run_worker(
    config_path: Path, config: Config, index: int, workers: int, supervisor_fd: int
) -> None:
    link = socket.socket(fileno=supervisor_fd)
    link.setblocking(False)
    gateway = Gateway(config, reuse_port=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def parent_gone() -> None:
        try:
            if link.recv(64):
                return  # the parent sends nothing; ignore it if it ever does
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        loop.remove_reader(link.fileno())
        if not stop.is_set():
            log.warning("worker %d: the supervisor is gone; stopping", index)
            stop.set()

    loop.add_reader(link.fileno(), parent_gone)

    def announce() -> None:
        with contextlib.suppress(OSError):  # the parent may be gone; parent_gone stops us
            link.send(READY)
        log.info(
            "worker %d of %d (pid %d) listening: SMTP %s:%d, audit instance %s",
            index,
            workers,
            os.getpid(),
            config.smtp.listen.host,
            gateway.smtp_port,
            config.audit.instance,
        )

    await run_gateway(gateway, config_path, stop, announce)
    with contextlib.suppress(ValueError):
        loop.remove_reader(link.fileno())
    link.close()
