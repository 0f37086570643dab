"""Wiring: one process runs SMTP intake, delivery workers and the HTTP API in one loop."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from gateway.audit import AuditLog
from gateway.config import Config, ConfigError, load_config
from gateway.credentials import Credentials
from gateway.delivery import Delivery
from gateway.intake import Intake
from gateway.known_domains import KnownDomains
from gateway.metrics import Metrics
from gateway.policy_source import PolicySource
from gateway.protect import Protector
from gateway.retention import retention_loop
from gateway.smtp_in import Counters, Handler, start_smtp
from gateway.transports import Transport, make_transport
from quarantine.db import Store
from quarantine.migrate import SchemaStatus, schema_status, upgrade

if TYPE_CHECKING:
    from gateway.approvals import OnDecision
    from gateway.workflow_notices import WorkflowNotices

log = logging.getLogger(__name__)

CREDENTIAL_REFRESH_SECONDS = 5.0
# This instance's deliveries update the known domains at once; other instances' are
# read back this often (a domain they reached meanwhile counts as new: it holds).
KNOWN_DOMAINS_REFRESH_SECONDS = 60.0


class StartupError(Exception):
    """The gateway cannot start; the message tells the operator what to do."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the gateway owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], datetime] = utcnow,
        transport: Transport | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        # Set only by `serve --workers N`: N processes listen on the same ports and the
        # kernel spreads connections. A lone gateway keeps "address in use" for a port
        # that is taken, which is what an operator who started it twice should see.
        self.reuse_port = reuse_port
        self.clock = clock
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.store = Store(config.store.url, pool_size=config.store.pool_size)
        self.audit: AuditLog | None = None
        self.policy = PolicySource(config)
        self.credentials = Credentials(self.store)
        self.known_domains = KnownDomains(self.store)
        self.counters = Counters()
        self._transport = transport
        self._tasks: list[asyncio.Task[None]] = []
        self._smtp: asyncio.Server | None = None
        self._http: _QuietServer | None = None
        self.delivery: Delivery | None = None
        self.intake: Intake | None = None
        self.notices: WorkflowNotices | None = None
        self.smtp_port = 0
        self.http_port = 0
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        await check_schema(self.store)
        self.metrics = Metrics(self.store, self.clock, lambda: self.counters.active)
        self.audit = AuditLog(
            self.config.audit.path, clock=self.clock, instance=audit_instance(self.config)
        )
        self.audit.subscribe(self.metrics.observe)
        self.audit.subscribe(self.known_domains.observe)
        await self.credentials.refresh()
        await self.known_domains.refresh()
        transport = self._transport or make_transport(self.config.delivery)
        protector = Protector(
            self.store,
            self.audit,
            self.config,
            self.policy.current,
            self.clock,
            wake=lambda: self.delivery.wake() if self.delivery else None,
        )
        self.delivery = Delivery(
            self.store,
            self.audit,
            transport,
            self.config.delivery,
            self.clock,
            owner=self.instance,
            reporting_host=self.config.smtp.hostname,
            prepare=protector.prepare,
            after_recorded=protector.after_recorded,
            known_domains=self.known_domains.current,
            hold_for=self.config.approval.expire_after,
        )
        approval = self.config.approval
        self.intake = intake = Intake(
            self.store,
            self.audit,
            self.policy.current,
            self.clock,
            reject_bare_newlines=self.config.smtp.bare_newline.value == "reject",
            hold_expiry=lambda now: now + approval.expire_after,
            on_queued=self.delivery.wake,
            handoff=self.delivery,
            on_held=self._on_held if approval.notify_by_mail else None,
            known_domains=self.known_domains.current,
        )
        handler = Handler(self.config.smtp, intake, self.credentials, self.audit, self.counters)
        self._smtp = await start_smtp(
            self.config.smtp, handler, self.counters, reuse_port=self.reuse_port
        )
        self.smtp_port = self._smtp.sockets[0].getsockname()[1]
        self._spawn(self.delivery.run(), "delivery")
        # SMTP is up: the approval workflow and the HTTP app load now, in a thread so
        # that sessions already connecting get their 220 meanwhile.
        approvals = await _load("gateway.approvals")
        self.notices = (await _load("gateway.workflow_notices")).WorkflowNotices(
            self.store,
            self.audit,
            self.config,
            self.credentials,
            self.clock,
            wake=self.delivery.wake,
        )
        # Holds expire from the store's timestamps, so expiry survives restarts.
        self._spawn(
            approvals.expiry_loop(
                self.store,
                self.config.approval,
                self.clock,
                audit=self.audit,
                wake=self.delivery.wake,
                on_decision=self._on_decision,
                notices=self.notices if approval.notify_by_mail else None,
            ),
            "expiry",
        )
        self._spawn(self._refresh_credentials(), "credentials")
        self._spawn(self._refresh_known_domains(), "known-domains")
        if self.config.store.keep_bodies is not None:
            self._spawn(
                retention_loop(self.store, self.config.store.keep_bodies, self.clock, self.audit),
                "retention",
            )
        await self._start_http()
        self.audit.emit(
            "gateway.started",
            instance=self.instance,
            smtp=self.smtp_port,
            http=self.http_port,
            upstream=str(self.config.delivery.upstream),
        )

    @property
    def _on_decision(self) -> OnDecision | None:
        if self.notices is None or not self.config.approval.notify_by_mail:
            return None
        return self.notices.decided

    async def _on_held(self, message_id: str) -> None:
        if self.notices is not None:
            await self.notices.held(message_id)

    async def _start_http(self) -> None:
        listen = self.config.admin.listen
        if listen is None:
            return
        sock = socket.socket(socket.AF_INET6 if ":" in listen.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        # Accepted sockets inherit TCP_NODELAY on Linux. Without it, a keep-alive client
        # waits ~40 ms per response (Nagle holding the body for the ACK of the headers,
        # which the client delays).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((listen.host, listen.port))
        self.http_port = sock.getsockname()[1]
        app = (await _load("gateway.http_api")).create_app(
            self.store,
            config=self.config,
            audit=self.audit,
            clock=self.clock,
            wake=self.delivery.wake if self.delivery else None,
            on_decision=self._on_decision,
            metrics=self.metrics,
        )
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self._http = _QuietServer(config)
        self._spawn(self._http.serve(sockets=[sock]), "http")
        while not self._http.started:
            await asyncio.sleep(0.01)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)

    async def _refresh_credentials(self) -> None:
        while True:
            await asyncio.sleep(CREDENTIAL_REFRESH_SECONDS)
            try:
                await self.credentials.refresh()
            except Exception:
                log.warning("could not refresh users from the store; keeping the cached ones")

    async def _refresh_known_domains(self) -> None:
        while True:
            await asyncio.sleep(KNOWN_DOMAINS_REFRESH_SECONDS)
            await self.known_domains.refresh()  # logs and keeps the last set on failure

    def reload(self, path: str | os.PathLike[str]) -> bool:
        """SIGHUP: re-read rules and clients. A config with errors keeps the old one."""
        try:
            config = load_config(path)
            self.policy.replace(config)
        except ConfigError as error:
            log.error("reload refused, keeping the running rules:\n%s", error)
            if self.audit:
                self.audit.emit("config.reload_failed", problems=error.problems[:20])
            return False
        if self.audit:
            self.audit.emit("config.reloaded", rules=len(config.rules), clients=len(config.clients))
        return True

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting, let sessions in flight finish, return leased work."""
        self.counters.draining = True
        if self._smtp is not None:
            self._smtp.close()
            await self._wait_sessions(grace)
        if self.intake is not None:
            await self.intake.close()
        if self.delivery is not None:
            await self.delivery.stop(grace=min(grace, 10.0))
        if self._http is not None:
            self._http.should_exit = True
        for task in self._tasks:
            if task.get_name() != "http":
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._transport is None and self.delivery is not None:
            with contextlib.suppress(Exception):
                await self.delivery._transport.close()
        if self.audit is not None:
            self.audit.emit("gateway.stopped", instance=self.instance)
            self.audit.close()
        await self.store.close()
        self.stopped.set()

    async def _wait_sessions(self, grace: float) -> None:
        deadline = asyncio.get_running_loop().time() + grace
        while self.counters.active > 0 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)


def audit_instance(config: Config) -> str:
    """The name of this gateway's audit chain: `[audit].instance`, else host and SMTP port."""
    return config.audit.instance or f"{socket.gethostname()}:{config.smtp.listen.port}"


async def check_schema(store: Store) -> None:
    """Create an empty schema; refuse one that is outdated, newer or not ours."""
    try:
        status = await schema_status(store)
    except Exception as error:
        raise StartupError(
            f"cannot open the store at {_safe_url(store.url)}: {type(error).__name__}: {error}"
        ) from None
    match status:
        case SchemaStatus.EMPTY:
            await upgrade(store)
        case SchemaStatus.CURRENT:
            pass
        case SchemaStatus.OUTDATED:
            raise StartupError(
                "the database schema is older than this release: run `sekisho migrate` first"
            )
        case SchemaStatus.NEWER:
            raise StartupError("the database was migrated by a newer release of Sekisho")
        case SchemaStatus.FOREIGN:
            raise StartupError(
                "the database has tables but no Sekisho schema version; "
                "point [store].url at an empty database"
            )


async def _load(name: str) -> Any:
    return await asyncio.to_thread(importlib.import_module, name)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


async def serve(config_path: Path) -> None:
    config = load_config(config_path)
    gateway = Gateway(config)

    def announce() -> None:
        log.info(
            "Sekisho listening: SMTP %s:%d, HTTP %s, delivering to %s",
            config.smtp.listen.host,
            gateway.smtp_port,
            f"{config.admin.listen.host}:{gateway.http_port}" if config.admin.listen else "off",
            config.delivery.upstream,
        )

    await run_gateway(gateway, config_path, asyncio.Event(), announce)


async def run_gateway(
    gateway: Gateway, config_path: Path, stop: asyncio.Event, announce: Callable[[], None]
) -> None:
    """Start, serve until `stop` is set (SIGTERM, SIGINT), then drain and stop; SIGHUP
    reloads the rules. Used by `serve` and by each `serve --workers` process."""
    loop = asyncio.get_running_loop()
    # Before start: SMTP answers while the rest is still loading, and a SIGTERM then
    # must drain like any other, not kill the process mid-transaction; a SIGHUP's
    # default action would kill it outright.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: gateway.reload(config_path))
    try:
        await gateway.start()
        announce()
        await stop.wait()
        log.info("shutting down: finishing sessions and deliveries in flight")
    finally:
        # also after a failed start: whatever had started drains and hands back work
        await gateway.stop()
