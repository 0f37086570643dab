"""SQLite's one writer across processes: the writer lock file beside the database.

Real processes on one database file. A transaction that reads and then writes is the
case SQLite cannot queue by itself: another process can commit between the read and
the write, and the update is lost, or the write fails at once with `database is
locked` (SQLITE_BUSY_SNAPSHOT; busy_timeout does not apply). With the lock, writers of every
process take turns and each transaction starts after the last one committed.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from quarantine.db import Store

ROUNDS = 150  # per process, half through Store.run and half through Store.transaction

# One writer process: read the counter, then write it back plus one, ROUNDS times.
WRITER = """
import asyncio, sys
from sqlalchemy import text
from quarantine.db import Store

async def main(url, lock):
    store = Store(url)
    if lock == "off":
        store._writer_file = None  # what the test shows SQLite alone cannot do
    def bump(session):
        value = session.execute(text("SELECT n FROM counter")).scalar_one()
        session.execute(text("UPDATE counter SET n = :n"), {"n": value + 1})
    try:
        for i in range(int(sys.argv[3])):
            if i % 2:
                await store.run(bump)
            else:
                async with store.transaction() as session:
                    value = (await session.execute(text("SELECT n FROM counter"))).scalar_one()
                    await session.execute(text("UPDATE counter SET n = :n"), {"n": value + 1})
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _prepare(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'store.db'}"

    async def create() -> None:
        store = Store(url)
        try:
            async with store.transaction() as session:
                await session.execute(text("CREATE TABLE counter (n INTEGER NOT NULL)"))
                await session.execute(text("INSERT INTO counter VALUES (0)"))
        finally:
            await store.close()

    asyncio.run(create())
    return url


def _count(url: str) -> int:
    async def read() -> int:
        store = Store(url)
        try:
            async with store.read() as session:
                return int((await session.execute(text("SELECT n FROM counter"))).scalar_one())
        finally:
            await store.close()

    return asyncio.run(read())


def _writers(url: str, lock: str, processes: int = 2) -> list[subprocess.CompletedProcess[str]]:
    started = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, url, lock, str(ROUNDS)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for process in started:
        out, err = process.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    return results


@pytest.mark.timeout(240)
def test_writers_in_several_processes_take_turns_and_lose_no_update(tmp_path: Path) -> None:
    url = _prepare(tmp_path)
    results = _writers(url, "on", processes=3)
    assert [r.returncode for r in results] == [0, 0, 0], [r.stderr[-2000:] for r in results]
    assert _count(url) == 3 * ROUNDS
    assert (tmp_path / "store.db-writer.lock").exists()


@pytest.mark.timeout(240)
def test_without_the_lock_sqlite_alone_fails_such_writers(tmp_path: Path) -> None:
    """The reason the lock exists: the same load, unlocked, fails with `database is
    locked` or loses updates (Python's sqlite3 starts the transaction only at the
    first write, so the read before it is not part of it)."""
    url = _prepare(tmp_path)
    broken = []
    for attempt in range(1, 4):  # the race needs the processes to overlap; they nearly always do
        results = _writers(url, "off")
        if any(r.returncode != 0 for r in results) or _count(url) != attempt * 2 * ROUNDS:
            broken.append(attempt)
            break
    assert broken, "two unlocked writers never collided"


def test_a_writer_that_dies_holding_the_lock_does_not_block_the_others(tmp_path: Path) -> None:
    url = _prepare(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "store.db-writer.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    started = time.monotonic()
    assert _writers(url, "on", processes=1)[0].returncode == 0
    assert _count(url) == ROUNDS
    assert time.monotonic() - started < 60


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


async def test_a_writer_cancelled_while_waiting_for_the_lock_gives_it_back(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    other = os.open(tmp_path / "store.db-writer.lock", os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)  # another process's writer, in effect

        async def write() -> None:
            async with store.transaction() as session:
                await session.execute(text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))

        waiting = asyncio.create_task(write())
        await asyncio.sleep(0.2)
        assert not waiting.done(), "the transaction did not wait for the other writer"
        waiting.cancel()
        fcntl.flock(other, fcntl.LOCK_UN)
        with pytest.raises(asyncio.CancelledError):
            await waiting
        # The store thread took the lock after the cancel and must have let it go:
        # another process can take it, and this store can write again.
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
        await asyncio.wait_for(write(), 10)
    finally:
        os.close(other)
        await store.close()


# --- within one process: the write lock's order ---------------------------------------


async def test_an_urgent_writer_goes_ahead_of_ordinary_ones_already_waiting() -> None:
    from quarantine.db import WriteLock

    lock, order = WriteLock(), []

    async def writer(name: str, urgent: bool) -> None:
        await lock.acquire(urgent=urgent)
        order.append(name)
        await asyncio.sleep(0)
        lock.release()

    await lock.acquire()
    waiting = [asyncio.create_task(writer("claim", False))]
    await asyncio.sleep(0)
    waiting.append(asyncio.create_task(writer("record", False)))
    await asyncio.sleep(0)
    waiting.append(asyncio.create_task(writer("commit", True)))
    await asyncio.sleep(0)
    lock.release()
    await asyncio.gather(*waiting)
    assert order == ["commit", "claim", "record"]
    assert not lock.locked()


async def test_a_writer_cancelled_as_it_gets_the_lock_passes_it_on() -> None:
    from quarantine.db import WriteLock

    lock = WriteLock()
    await lock.acquire()
    first = asyncio.create_task(lock.acquire())
    second = asyncio.create_task(lock.acquire(urgent=True))
    gone = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0)
    gone.cancel()  # still waiting: leaves the queue
    lock.release()  # handed to `second` (urgent) ...
    second.cancel()  # ... which is cancelled before it runs: it passes the lock on
    with pytest.raises(asyncio.CancelledError):
        await second
    with pytest.raises(asyncio.CancelledError):
        await gone
    await asyncio.wait_for(first, 1)
    assert lock.locked()
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


async def test_a_waiter_cancelled_just_before_a_release_is_skipped_and_still_cancelled() -> None:
    from quarantine.db import WriteLock

    lock = WriteLock()
    await lock.acquire()
    gone = asyncio.create_task(lock.acquire())
    after = asyncio.create_task(lock.acquire())
    await asyncio.sleep(0)  # both wait, `gone` first
    gone.cancel()
    lock.release()  # in the same tick: skips the cancelled turn, hands the lock on
    with pytest.raises(asyncio.CancelledError):  # not a ValueError from its queue
        await gone
    await asyncio.wait_for(after, 1)
    assert lock.locked()
    lock.release()
    assert not lock.locked()


async def test_store_run_puts_a_waiting_commit_before_queued_bookkeeping(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'order.db'}")
    order: list[str] = []
    try:
        loop, started = asyncio.get_running_loop(), asyncio.Event()

        def slow(_session: object) -> None:  # the transaction running when both arrive
            loop.call_soon_threadsafe(started.set)
            time.sleep(0.2)
            order.append("running")

        running = asyncio.create_task(store.run(slow, durable=False))
        await started.wait()
        record = asyncio.create_task(store.run(lambda _s: order.append("record"), durable=False))
        await asyncio.sleep(0.01)
        commit = asyncio.create_task(store.run(lambda _s: order.append("commit"), urgent=True))
        await asyncio.gather(running, record, commit)
    finally:
        await store.close()
    assert order == ["running", "commit", "record"]
