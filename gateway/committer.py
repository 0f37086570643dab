"""Group commit: messages that arrive while a commit is in progress share the next one.

Each submitter waits for the commit that holds its own message, so every 250 still
follows its own durable commit (Postfix says "queued" only after fsync; so do we),
but twenty concurrent sessions pay for a few fsyncs instead of twenty. There is no
artificial wait: a lone message commits at once.

With a `Handoff` (delivery), the commit also leases the recipients of queued messages
to this gateway's delivery, as far as it has free workers, and hands it their claims:
a message's first send needs no claiming transaction and no second read of its body
(Postfix's queue manager, too, takes new mail straight from the incoming queue).
The same commit carries the outcomes delivery has waiting to be recorded (`Ride`):
while mail arrives, recording a send costs no transaction of its own. They are settled
after the submitters have been answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy.orm import Session

from quarantine import repository as repo
from quarantine.db import Store
from quarantine.repository import Claim, Lease, NewMessage, transactions_of
from quarantine.states import MessageState

log = logging.getLogger(__name__)

MAX_BATCH = 64


class Closed(Exception):
    """The committer is closing: the message was not stored (the client hears 451)."""


class Ride(Protocol):
    """Delivery's outcomes waiting to be recorded, carried by an intake commit."""

    def apply(self, session: Session) -> None:
        """Record them in the commit's transaction, in a savepoint of their own: their
        failure is kept for `settle`, and the messages still commit, unless the
        transaction itself was lost with it (then this raises, and the commit fails)."""
        ...

    def settle(self, committed: bool) -> None:
        """After the commit: tell the sends their outcomes are recorded, or give the
        outcomes back to delivery's own recorder (not committed, or `apply` failed)."""
        ...


class Handoff(Protocol):
    """Where the claims of just-committed messages go (`Delivery`)."""

    owner: str

    def reserve(self, transactions: int) -> int:
        """Keep up to this many workers free for claims about to be committed; say
        how many were kept."""
        ...

    def lease_until(self) -> datetime: ...

    def hand_over(self, claims: Sequence[Claim], reserved: int) -> None:
        """Start these claims' sends; free what was reserved (claims or not). Called
        after every commit, failed or not: it also says intake is committing."""
        ...

    def ride(self) -> Ride | None:
        """Outcomes to record in this commit, if any are waiting."""
        ...


class GroupCommitter:
    def __init__(
        self, store: Store, max_batch: int = MAX_BATCH, handoff: Handoff | None = None
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._handoff = handoff
        self._pending: list[tuple[NewMessage, datetime, asyncio.Future[bool]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The batch being committed: its submitters are told, whatever happens.
        self._inflight: Sequence[tuple[NewMessage, datetime, asyncio.Future[bool]]] = ()
        self._closed = False

    async def commit(self, message: NewMessage, now: datetime) -> bool:
        """Return once `message` is durably committed; raise if it could not be.
        True: its claims went to delivery with the commit, nothing to wake."""
        if self._closed:
            raise Closed("the gateway is stopping")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="committer")
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((message, now, done))
        self._wake.set()
        return await done

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
                except Exception as error:  # a bug, not the store: still, each hears 451
                    log.exception("group commit of %d messages failed", len(batch))
                    for _, _, done in batch:
                        _settle(done, error)
                finally:
                    self._inflight = ()
                # Not kept alive until the next message: it may hold 50 MB of body.
                del batch

    async def _commit(
        self, batch: Sequence[tuple[NewMessage, datetime, asyncio.Future[bool]]]
    ) -> None:
        rows = [(m, now) for m, now, _ in batch]
        lease, reserved = self._lease(rows)
        ride = self._handoff.ride() if self._handoff is not None else None

        def work(session: Session) -> list[Claim]:
            claims = repo.add_messages(session, rows, lease)
            if ride is not None:
                ride.apply(session)
            return claims

        try:
            claims = await self._store.run(work, urgent=True)
        except BaseException as error:
            if ride is not None:
                ride.settle(committed=False)
            if self._handoff is not None:
                self._handoff.hand_over((), reserved)
            if not isinstance(error, Exception):
                raise
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
        # Submitters first: each one's `message.accepted` is audited before its send
        # can begin.
        handed = lease.message_ids if lease is not None else frozenset()
        for message, _, done in batch:
            _settle(done, None, message.id in handed)
        if ride is not None:  # after the submitters have answered their clients
            asyncio.get_running_loop().call_soon(_settle_ride, ride)
        if self._handoff is not None:
            try:
                self._handoff.hand_over(claims, reserved)
            except Exception:  # committed and leased: the leases run out, then a claim
                log.exception("handing claims to delivery failed")

    def _lease(self, rows: Sequence[tuple[NewMessage, datetime]]) -> tuple[Lease | None, int]:
        """Which queued messages of the batch delivery can start at once: as many
        transactions as it has free workers, whole messages only, in order."""
        if self._handoff is None:
            return None, 0
        queued = [(m.id, transactions_of(m)) for m, _ in rows if m.state is MessageState.QUEUED]
        if not queued:
            return None, 0
        until = self._handoff.lease_until()  # before reserving: nothing after it may fail
        reserved = self._handoff.reserve(sum(n for _, n in queued))
        taken, left = set(), reserved
        for message_id, transactions in queued:
            if transactions <= left:
                taken.add(message_id)
                left -= transactions
        if not taken:
            return None, reserved
        return Lease(self._handoff.owner, until, taken), reserved

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


def _settle_ride(ride: Ride) -> None:
    try:
        ride.settle(committed=True)
    except Exception:  # recorded and committed: only their audit lines are missing
        log.exception("settling the outcomes recorded with a commit failed")


def _settle(done: asyncio.Future[bool], error: BaseException | None, handed: bool = False) -> None:
    if done.done():  # the submitter went away (connection lost); nothing to tell
        return
    if error is None:
        done.set_result(handed)
    else:
        done.set_exception(error)
