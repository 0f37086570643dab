"""The store's hot-path transactions one at a time, as one SMTP session makes them.

    python bench/store.py [--messages 500] [--store-url sqlite|postgresql://…]

For each message: accept (insert, durable commit), claim (delivery's lease), record
(its outcome and the message's end). Prints the median wall time of each through
`Store.run` (hand-off, transaction, commit, back on the loop) and the CPU its work
function took on the store's thread (statements only, without begin and commit).
SQLite in a temp dir (WAL, synchronous=FULL), or a fresh database created on the given
PostgreSQL server and dropped afterwards. The first 10 % are left out as warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from quarantine import repository as repo
from quarantine.db import Store
from quarantine.migrate import upgrade
from quarantine.repository import NewMessage, OutcomeRow
from quarantine.states import MessageState, RecipientState

T = TypeVar("T")


async def run(store: Store, messages: int) -> dict[str, list[float]]:
    await upgrade(store)
    figures: dict[str, list[float]] = {}

    def timed(name: str, work: Callable[[Any], T]) -> Callable[[Any], T]:
        def measured(session: Any) -> T:
            started = time.thread_time()
            try:
                return work(session)
            finally:
                figures.setdefault(f"{name} cpu", []).append(time.thread_time() - started)

        return measured

    async def wall(name: str, call: Any) -> Any:
        started = time.perf_counter()
        result = await call
        figures.setdefault(f"{name} wall", []).append(time.perf_counter() - started)
        return result

    raw = os.urandom(2560).hex().encode()
    verdict = {"action": "deliver", "rule": None, "trace": []}
    for n in range(messages):
        now = datetime.now(UTC)
        new = NewMessage(
            id=f"m{n}",
            mail_from="a@example.com",
            rcpt_tos=["b@client.example"],
            raw=raw,
            state=MessageState.QUEUED,
            verdict=verdict,
        )
        add = functools.partial(repo.add_messages, batch=[(new, now)])
        await wall("accept", store.run(timed("accept", add)))
        claim = functools.partial(
            repo.claim_due, owner="gw", now=now, lease=timedelta(minutes=5), limit=200
        )
        claims = await wall("claim", store.run(timed("claim", claim), durable=False))
        recipient = claims[0].recipients[0].id

        def record(
            session: Any, recipient: int = recipient, mid: str = new.id, now: datetime = now
        ) -> None:
            outcome = OutcomeRow(recipient, RecipientState.DELIVERED, 250, "2.0.0 ok")
            repo.record_outcomes(session, [outcome], owner="gw", now=now)
            repo.finish_messages(session, [mid], now)

        await wall("record", store.run(timed("record", record), durable=False))
    return figures


async def main_async(args: argparse.Namespace, tmp: Path) -> None:
    if args.store_url == "sqlite":
        url = f"sqlite:///{tmp / 'store.db'}"
        drop = None
    else:
        import asyncpg  # type: ignore[import-untyped]

        name = f"sekisho_bench_{os.getpid()}"
        admin = await asyncpg.connect(args.store_url.replace("+asyncpg", ""))
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = args.store_url.rsplit("/", 1)[0] + f"/{name}"
        drop = (admin, name)
    store = Store(url)
    try:
        figures = await run(store, args.messages)
    finally:
        await store.close()
        if drop is not None:
            await drop[0].execute(f'DROP DATABASE "{drop[1]}"')
            await drop[0].close()
    skip = args.messages // 10
    print(f"{args.messages} messages, one at a time, store={args.store_url.split(':')[0]}")
    for name, values in figures.items():
        kept = values[skip:]
        print(f"  {name:12s} median {statistics.median(kept) * 1e6:7.0f} µs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--store-url", default="sqlite")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="sekisho-bench-"))
    try:
        asyncio.run(main_async(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
