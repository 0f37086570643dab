"""Group commit: messages that arrive while a commit is in progress share the next one.

Each submitter waits for the commit that holds its own message, so every 250 still
follows its own durable commit (Postfix says "queued" only after fsync; so do we),
but twenty concurrent sessions pay for a few fsyncs instead of twenty. There is no
artificial wait: a lone message commits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime

from quarantine import repository as repo
from quarantine.db import Store
from quarantine.repository import NewMessage

log = logging.getLogger(__name__)

MAX_BATCH = 64


class Closed(Exception):
    """The committer is closing: the message was not stored (the client hears 451)."""


class GroupCommitter:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[tuple[NewMessage, datetime, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The batch being committed: its submitters are told, whatever happens.
        self._inflight: Sequence[tuple[NewMessage, datetime, asyncio.Future[None]]] = ()
        self._closed = False

    async def commit(self, message: NewMessage, now: datetime) -> None:
        """Return once `message` is durably committed; raise if it could not be."""
        if self._closed:
            raise Closed("the gateway is stopping")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="committer")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((message, now, done))
        self._wake.set()
        await done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: len(batch)]
                self._inflight = batch
                try:
                    await self._commit(batch)
                finally:
                    self._inflight = ()
                # Not kept alive until the next message: it may hold 50 MB of body.
                del batch

    async def _commit(
        self, batch: Sequence[tuple[NewMessage, datetime, asyncio.Future[None]]]
    ) -> None:
        try:
            rows = [(m, now) for m, now, _ in batch]
            await self._store.run(lambda session: repo.add_messages(session, rows))
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0][2], error)
                return
            # One bad message must not fail the others: commit them one by one.
            log.warning(
                "group commit of %d messages failed (%s); retrying singly",
                len(batch),
                type(error).__name__,
            )
            for item in batch:
                await self._commit([item])
            return
        for _, _, done in batch:
            _settle(done, None)

    async def close(self, grace: float = 10.0) -> None:
        """Refuse new messages, let those already handed over commit (each submitter
        hears how its own commit went), then stop. A commit is never cut off halfway:
        its client would not know whether the message was taken."""
        self._closed = True
        deadline = asyncio.get_running_loop().time() + grace
        while (self._pending or self._inflight) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        cut_off = self._inflight  # the task's own finally forgets it when cancelled
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, _, done in cut_off:  # cut off: each client hears 451, never nothing
            _settle(done, Closed("the gateway stopped while the message was being stored"))
        for _, _, done in self._pending:  # the store never answered within the grace
            _settle(done, Closed("the gateway stopped before the message was stored"))
        self._pending.clear()


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # the submitter went away (connection lost); nothing to tell
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
