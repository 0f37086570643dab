"""Engines for SQLite (embedded default) and PostgreSQL (several instances)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

T = TypeVar("T")


def async_url(url: str) -> str:
    """Map the operator's URL onto the async drivers: aiosqlite and asyncpg."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
    raise ValueError(f"unsupported database {backend!r}")


def _sqlite_pragmas(synchronous: str) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        # WAL lets readers run beside the writer; synchronous=FULL fsyncs the WAL on
        # every commit, which is what lets a 250 mean the message survives a power cut.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    return on_connect


class Store:
    """The engine, its sessions, and the write discipline each database needs.

    SQLite has one writer at a time: write transactions queue on a process-local
    lock, then on the writer lock file every process shares (`serve --workers`, a
    CLI command beside a running gateway), instead of failing with `database is
    locked` or losing an update. PostgreSQL needs no lock.

    Two kinds of write transaction. A durable one (the default) is on disk when it
    returns: accepting a message, a decision over HTTP, a ZIP password. A
    bookkeeping one (`durable=False`) is atomic but its flush to disk rides on the
    next durable commit: delivery's leases and outcomes, whose loss in a power cut
    can only make a message be sent again, never lost (Postfix does not fsync the
    removal of a delivered queue file either). A crash of the process loses neither:
    SQLite's WAL and PostgreSQL's WAL buffers survive it; only the OS or the power
    going away can.
    """

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = async_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        kwargs: dict[str, Any] = {"echo": echo}
        database = sqlite_file(self.url)
        if database is not None:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        if not self.is_sqlite:
            kwargs.update(
                pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, pool_timeout=10
            )
        self.engine: AsyncEngine = create_async_engine(self.url, **kwargs)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._bookkeeping = self.sessions
        self._write_lock = WriteLock() if self.is_sqlite else None
        self._writer_file: WriterFileLock | None = None
        if database is not None:
            self._writer_file = WriterFileLock(f"{database}-writer.lock")
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas("FULL"))
            # synchronous is a property of the connection, so bookkeeping gets its
            # own small pool; the write lock above still serialises both.
            self._lazy_engine = create_async_engine(self.url, **kwargs)
            event.listen(self._lazy_engine.sync_engine, "connect", _sqlite_pragmas("NORMAL"))
            self._bookkeeping = async_sessionmaker(self._lazy_engine, expire_on_commit=False)
            # `run`: the same two kinds of connection, used only by the store's thread.
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="sekisho-store")
            sync_url = make_url(self.url).set(drivername="sqlite+pysqlite")
            self._sync_engines = []
            self._sync_sessions: dict[bool, sessionmaker[Session]] = {}
            for durable, synchronous in ((True, "FULL"), (False, "NORMAL")):
                engine = create_engine(sync_url, echo=echo, poolclass=StaticPool)
                event.listen(engine, "connect", _sqlite_pragmas(synchronous))
                self._sync_engines.append(engine)
                self._sync_sessions[durable] = sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def transaction(self, *, durable: bool = True) -> AsyncIterator[AsyncSession]:
        """One write transaction: commits on success, rolls back on any exception.
        `durable=False`: see the class docstring for what may skip the fsync."""
        sessions = self.sessions if durable else self._bookkeeping
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
                if self._writer_file is not None:
                    await self._take_writer_file()
                    stack.callback(self._writer_file.release)
            session = await stack.enter_async_context(sessions())
            await stack.enter_async_context(session.begin())
            if not durable and not self.is_sqlite:
                await session.execute(_NOT_SYNCHRONOUS)
            yield session

    async def run(
        self, work: Callable[[Session], T], *, durable: bool = True, urgent: bool = False
    ) -> T:
        """Run `work(session)` as one write transaction and return its result.

        The hot path's transactions (accepting, claiming, recording) go through here.
        On SQLite the whole transaction runs on the store's own thread with the
        standard sqlite3 driver: one hand-off per transaction, where the async
        driver makes three or four per statement. `work` therefore runs off the event
        loop and must only touch the session. On PostgreSQL it runs in the async
        session like any other transaction.

        `urgent`: a client is waiting for this commit (its 250). On SQLite it goes
        ahead of the bookkeeping transactions queued for the writer, so a message's
        commit waits for at most the one transaction already running, never for a
        queue of delivery's claims and recordings.
        """
        if not self.is_sqlite:
            async with self.transaction(durable=durable) as session:
                return await session.run_sync(work)
        assert self._write_lock is not None
        await self._write_lock.acquire(urgent=urgent)
        try:
            loop = asyncio.get_running_loop()
            done = loop.run_in_executor(self._thread, self._run_here, work, durable)
            try:
                return await asyncio.shield(done)
            except asyncio.CancelledError:
                # The thread goes on with the transaction: the write lock stays held
                # until it has committed or rolled back, or the next writer would
                # meet SQLite's own lock instead of ours.
                await asyncio.wait({done})
                raise
        finally:
            self._write_lock.release()

    def _run_here(self, work: Callable[[Session], T], durable: bool) -> T:
        if self._writer_file is None:
            return self._work_here(work, durable)
        self._writer_file.acquire()
        try:
            return self._work_here(work, durable)
        finally:
            self._writer_file.release()

    def _work_here(self, work: Callable[[Session], T], durable: bool) -> T:
        with self._sync_sessions[durable].begin() as session:
            return work(session)

    async def _take_writer_file(self) -> None:
        """Wait, on the store's thread, until no other process is writing."""
        assert self._writer_file is not None
        loop = asyncio.get_running_loop()
        taken = loop.run_in_executor(self._thread, self._writer_file.acquire)
        try:
            await asyncio.shield(taken)
        except asyncio.CancelledError:
            # The thread still takes the lock: give it back when it has, or every other
            # process would wait for this one forever (a callback, so that a second
            # cancellation cannot skip it).
            taken.add_done_callback(self._give_back_writer_file)
            await asyncio.wait({taken})  # given back (the callback runs first) on return
            raise

    def _give_back_writer_file(self, taken: asyncio.Future[None]) -> None:
        if self._writer_file is not None and not taken.cancelled() and taken.exception() is None:
            self._writer_file.release()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        async with self.sessions() as session:
            yield session

    async def close(self) -> None:
        await self.engine.dispose()
        if self.is_sqlite:
            await self._lazy_engine.dispose()
            loop = asyncio.get_running_loop()
            for engine in self._sync_engines:  # closed by the thread that opened them
                await loop.run_in_executor(self._thread, engine.dispose)
            self._thread.shutdown(wait=True)
            if self._writer_file is not None:
                self._writer_file.close()


class WriteLock:
    """The process's SQLite writer lock: first come, first served, except that an
    urgent writer (a commit a client is waiting on) goes ahead of every ordinary one
    waiting. Released, it passes straight to the next waiter, so nobody arriving in
    between can slip in front. At most one urgent writer waits at a time (the group
    committer), so the others cannot starve: they get the lock between its commits."""

    def __init__(self) -> None:
        self._locked = False
        self._urgent: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ordinary: collections.deque[asyncio.Future[None]] = collections.deque()

    def locked(self) -> bool:
        return self._locked

    async def acquire(self, *, urgent: bool = False) -> None:
        if not self._locked:
            self._locked = True
            return
        queue = self._urgent if urgent else self._ordinary
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # it was handed to us as we were cancelled: pass it on
            elif turn in queue:  # a release may already have skipped it
                queue.remove(turn)
            raise

    def release(self) -> None:
        if not self._locked:
            raise RuntimeError("WriteLock released while not held")
        for queue in (self._urgent, self._ordinary):
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    turn.set_result(None)  # still locked: now the waiter's
                    return
        self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *_exc: object) -> None:
        self.release()


class WriterFileLock:
    """SQLite's one writer, across processes: an flock on `<database>-writer.lock`.

    SQLite itself lets a second writer fail with `database is locked` or, in WAL
    mode, retry in sleeps of up to 100 ms; and a transaction that read before it
    writes can fail outright when another process committed in between. Holding
    this lock around every write transaction (after the process's own asyncio lock)
    makes writers of several processes (`serve --workers`, the CLI beside a running
    gateway) queue in the kernel instead, and start their transaction only once the
    last writer has committed. The lock goes with the process if it dies.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        # Read-only is enough for flock, so a user who may only read the database can
        # open it too, and a file first made by root (`sekisho users add`) stays
        # usable by the gateway's own user.
        self._fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def acquire(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


# PostgreSQL: this transaction's commit returns before its WAL record is flushed.
_NOT_SYNCHRONOUS = text("SET LOCAL synchronous_commit TO OFF")


def sqlite_file(url: str) -> str | None:
    """The database file of a SQLite URL; None for PostgreSQL or an in-memory SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database
    return database if database and database != ":memory:" else None
