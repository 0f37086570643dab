"""Delivery workers: claim due recipients under a lease, send, record each outcome.

Each recipient's result is committed once the upstream answers, in the next
bookkeeping transaction (the results of sends that finish together share one). On
SQLite, while intake is committing new mail, results first wait up to a few
milliseconds for its next commit to carry them (`Ride`): one transaction, one turn of
the single writer, for the new message and the last one's result, where a separate
recording would have made that message's 250 wait behind it. Results that a ride gave
back are recorded by delivery alone, at once, and never ride again.
Delivery is at-least-once across a crash mid-send: a lease that expires is taken
over by another worker (or instance), which may send again what the dead one had
sent but not yet recorded. Leases and results are bookkeeping (`durable=False`, see
`Store`; a ride makes them durable with the message it rides with): a power cut may
forget them, which can only mean a second send.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from gateway.audit import AuditLog, Event
from gateway.config import DeliveryConfig
from gateway.dsn import Failed, build_dsn
from gateway.errors import PermanentFailure, SmtpFailure, TemporaryFailure
from gateway.ids import new_id
from gateway.protect import HoldForReview
from gateway.transports import Results, Transport
from policies.verdict import Verdict
from quarantine import approvals as qa
from quarantine import repository as repo
from quarantine.db import Store
from quarantine.repository import Claim, ClaimedRecipient, NewMessage, OutcomeRow
from quarantine.states import MessageState, RecipientState

log = logging.getLogger(__name__)

# A prepared delivery: the bytes to send to some of a claim's recipients. The
# encryption and Bcc transforms turn one stored message into one or more of these.
Prepare = Callable[[Claim, bytes], Awaitable[Sequence[tuple[Sequence[str], bytes | bytearray]]]]
AfterRecorded = Callable[[Session, Claim, datetime], list[Event]]


async def send_as_stored(
    claim: Claim, raw: bytes
) -> Sequence[tuple[Sequence[str], bytes | bytearray]]:
    return [([r.address for r in claim.recipients], raw)]


# Claims recorded in one bookkeeping transaction at most.
RECORD_BATCH = 64
# Sends in flight with which delivery still takes new mail straight from intake's
# commit (`Delivery.reserve`).
NEARLY_IDLE = 1
# On SQLite, outcomes wait at most this long (seconds) for an intake commit to take
# them, and only while intake is committing: its last commit is more recent than
# INTAKE_ACTIVE. One client sending message after message commits every ~1.5 ms; a
# lone message's own outcome waits the whole RIDE_WAIT, holding its worker that long.
# PostgreSQL has no single writer to share, so nothing waits there.
RIDE_WAIT = 0.005
INTAKE_ACTIVE = 0.05


@dataclass(frozen=True, slots=True)
class Outcome:
    recipient: ClaimedRecipient
    state: RecipientState
    code: int | None
    response: str
    next_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class _Pending:
    claim: Claim
    outcomes: Sequence[Outcome]
    done: asyncio.Future[None]


class Delivery:
    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        transport: Transport,
        config: DeliveryConfig,
        clock: Callable[[], datetime],
        *,
        owner: str,
        reporting_host: str,
        prepare: Prepare = send_as_stored,
        rng: random.Random | None = None,
        hold_for: timedelta = timedelta(days=3),
        after_recorded: AfterRecorded | None = None,
        known_domains: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self._store = store
        self._audit = audit
        self._transport = transport
        self._config = config
        self._clock = clock
        self.owner = owner
        self._host = reporting_host
        self._prepare = prepare
        self._rng = rng or random.Random()
        self._after_recorded = after_recorded
        self._to_record: list[_Pending] = []
        self._alone: list[_Pending] = []  # given back by a ride: recorded alone, at once
        self._awaiting_record = 0  # sends done with the network, waiting for their record
        self._known_domains = known_domains
        self._recorder: asyncio.Task[None] | None = None
        self._last_intake_commit = float("-inf")  # loop time
        self._ridden = asyncio.Event()  # an intake commit took outcomes to record
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._reserved = 0  # workers kept for claims being committed by intake
        self._skipped = False  # a round found every worker reserved
        # Recipient ids of the sends in progress, whose leases the keeper renews.
        self._sending: dict[int, None] = {}
        self._slots = asyncio.Semaphore(config.workers)
        self._hold_for = hold_for
        self._between_rounds = asyncio.Event()
        self._between_rounds.set()
        # Delay windows end on their own schedule: look for them once per poll
        # interval, not on every claiming round.
        self._next_delay_check = datetime.min.replace(tzinfo=UTC)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Claim and send until stopped. A failing round is logged and retried: the
        loop never dies, and nothing claimed is dropped (its lease simply expires)."""
        keeper = asyncio.create_task(self._keep_leases(), name="lease-keeper")
        try:
            await self._claim_and_send()
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper

    async def _claim_and_send(self) -> None:
        while not self._stopping:
            self._between_rounds.clear()
            # Cleared before the round looks, not after: a message queued while the
            # round's claim runs sets it again and is claimed at once, not a poll later.
            self._wake.clear()
            try:
                more = await self.run_once()
            except Exception:
                log.exception("delivery round failed; retrying")
                more = False
            finally:
                self._between_rounds.set()
            if not more and not self._stopping:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        self._wake.wait(), self._config.poll_interval.total_seconds()
                    )

    async def run_once(self) -> bool:
        """Claim what is due (up to the free worker slots), start sending it; say
        whether to look again at once. Not when the claim took less than it could:
        everything due was taken, and a claim that finds nothing still costs a turn
        of the store's writer, which intake is waiting for."""
        now = self._clock()
        if now >= self._next_delay_check:
            # Scheduled from the time the check looks at, not from when it finished:
            # time that passes during the check must not be skipped.
            self._next_delay_check = now + self._config.poll_interval
            await self._release_due_delays()
        free = self._config.workers - len(self._inflight) - self._reserved
        if free <= 0:
            if self._reserved:
                # Workers are reserved for claims that intake is committing: they start
                # (or the reservation ends unused) when it hands them over, which wakes
                # us; a send in flight may take far longer to finish.
                self._skipped = True
                return False
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            return True
        now = self._clock()
        limit = free * 10
        claims = await self._store.run(
            functools.partial(
                repo.claim_due,
                owner=self.owner,
                now=now,
                lease=self._config.lease,
                limit=limit,
                max_groups=free,
            ),
            durable=False,
        )
        for claim in claims:
            self._start(claim)
        # Full: as many transactions as there were free workers, or as many recipients
        # as the claim reads at most; more may be due.
        return len(claims) >= free or sum(len(c.recipients) for c in claims) >= limit

    def _start(self, claim: Claim) -> None:
        self._sending.update(dict.fromkeys(r.id for r in claim.recipients))
        task = asyncio.create_task(self._deliver_guarded(claim))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    # -- claims straight from intake's commit (`gateway.committer.Handoff`)

    def reserve(self, transactions: int) -> int:
        # Only a (nearly) idle delivery takes claims from intake: at most one send in
        # flight, as when one client sends message after message, where a claiming
        # round would take just this one message and cost a transaction of its own. A
        # busier one claims new mail with its next round, many messages in one
        # transaction, and records their outcomes together; sends started one commit
        # at a time would each record alone, one store transaction per message
        # (bench/relay.py: 880 -> 370 msg/s). (Pending recordings belong to sends
        # still in flight.)
        #
        # Also while a claiming round runs. Refused then, each message the round
        # missed made the next round, and that one the next message's: one client's
        # mail went on claiming every message alone (one in five of 3,000 sent in a
        # row, each a store transaction more). The round's claims may then start
        # beside these, past `workers` by this commit's transactions at most: the
        # extra sends wait for a worker slot (`_slots`), their leases renewed
        # meanwhile like any send's (`_sending`), and none is claimed twice (intake's
        # rows are inserted leased, so the round cannot take them).
        busy = len(self._inflight) - self._awaiting_record > NEARLY_IDLE
        if self._stopping or busy or self._reserved:
            return 0
        self._reserved = max(0, min(transactions, self._config.workers - len(self._inflight)))
        return self._reserved

    def lease_until(self) -> datetime:
        return self._clock() + self._config.lease

    def hand_over(self, claims: Sequence[Claim], reserved: int) -> None:
        self._last_intake_commit = asyncio.get_running_loop().time()
        self._reserved -= reserved
        if self._skipped:  # a round gave way to this reservation: it may go on now
            self._skipped = False
            self.wake()
        if self._stopping:  # stop() hands back every lease of ours, these too
            return
        for claim in claims:
            self._start(claim)

    def ride(self) -> Ride | None:
        if not self._to_record or not self._store.is_sqlite:
            return None
        batch = self._to_record[:RECORD_BATCH]
        del self._to_record[: len(batch)]
        self._ridden.set()
        return Ride(self, batch, self._clock())

    async def drain(self) -> None:
        """Wait for every transaction in flight to finish and be recorded."""
        while self._inflight:
            await asyncio.wait(set(self._inflight))

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming, let sends in flight finish, and hand back our leases."""
        self._stopping = True
        self.wake()
        # A round still claiming would start sends after our leases were handed back,
        # and another instance would send them again: let it finish first.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._between_rounds.wait(), grace)
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:  # their connections are aborted before the leases go back
                await asyncio.wait(pending, timeout=grace)
        if self._recorder is not None:
            # Outcomes of finished sends are recorded before the leases go back;
            # otherwise they would be dropped and that mail sent again.
            await asyncio.wait({self._recorder}, timeout=grace)
        with contextlib.suppress(Exception):
            async with self._store.transaction(durable=False) as session:
                await repo.return_leases(session, self.owner)

    async def _release_due_delays(self) -> None:
        now = self._clock()
        # Look first with a read: most rounds find nothing, and a write transaction
        # would queue behind intake on SQLite's single writer for no reason.
        async with self._store.read() as session:
            due = await repo.due_delays(session, now)
        if not due:
            return
        released = []
        async with self._store.transaction(durable=False) as session:
            for message_id in await repo.due_delays(session, now):
                message = await qa.lock_message(session, message_id)
                # another instance may have released it (or the sender cancelled it)
                # while we waited for the lock
                if message is not None and message.state is MessageState.DELAYED:
                    await qa.release_locked(session, message, now)
                    released.append(message_id)
        for message_id in released:  # only what was committed reaches the audit log
            self._audit.emit("message.released", id=message_id, reason="delay-ended")

    async def _deliver_guarded(self, claim: Claim) -> None:
        async with self._slots:
            try:
                await self.deliver(claim)
            except Exception:
                # The lease will expire and the recipients be retried: parked, not lost.
                log.exception("delivery of %s failed unexpectedly", claim.message_id)
            finally:
                for recipient in claim.recipients:
                    self._sending.pop(recipient.id, None)

    async def _keep_leases(self) -> None:
        """Renew the leases of sends still in progress every third of a lease.

        A send may take longer than the lease (a 50 MB message to a slow smarthost):
        unrenewed, another worker would claim those recipients and send them again.
        Only leases still ours are pushed back, and only those of sends this process
        is running: the lease of a claim that failed unexpectedly runs out as it
        should, so the recipients are retried.
        """
        period = self._config.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(period)
            if not self._sending:
                continue
            try:
                async with self._store.transaction(durable=False) as session:
                    await repo.extend_leases(
                        session, self.owner, list(self._sending), self._clock() + self._config.lease
                    )
            except Exception:
                log.exception("renewing the leases of %d sends failed", len(self._sending))

    async def deliver(self, claim: Claim) -> None:
        raw = claim.raw
        if raw is None:
            failure: SmtpFailure = PermanentFailure("message body no longer stored", status="5.3.0")
            await self._record(claim, self._all(claim, failure))
            return
        try:
            batches = await self._prepare(claim, raw)
        except HoldForReview as reason:
            await self._hold(claim, str(reason))
            return
        except Exception as error:
            log.exception("preparing %s for delivery failed", claim.message_id)
            failure = TemporaryFailure(f"could not prepare the message: {type(error).__name__}")
            await self._record(claim, self._all(claim, failure))
            return
        by_address = {r.address: r for r in claim.recipients}
        for addresses, data in batches:
            outcomes = await self._send(claim, [by_address[a] for a in addresses], data)
            await self._record(claim, outcomes)

    async def _hold(self, claim: Claim, reason: str) -> None:
        async with self._store.transaction(durable=False) as session:
            now = self._clock()
            held = await repo.hold_message(
                session,
                claim.message_id,
                "protection-failed",
                now,
                ours=[r.id for r in claim.recipients],
                owner=self.owner,
                expires_at=now + self._hold_for,
            )
        if held:
            self._audit.emit(
                "message.held", id=claim.message_id, rule="protection-failed", reason=reason[:300]
            )

    async def _send(
        self, claim: Claim, recipients: Sequence[ClaimedRecipient], data: bytes | bytearray
    ) -> list[Outcome]:
        try:
            results = await self._transport.send(
                claim.mail_from, [r.address for r in recipients], data
            )
        except SmtpFailure as failure:
            return [self._outcome(r, failure.code, failure.reply()[4:]) for r in recipients]
        return self._per_recipient(recipients, results)

    def _per_recipient(
        self, recipients: Sequence[ClaimedRecipient], results: Results
    ) -> list[Outcome]:
        outcomes = []
        for r in recipients:
            code, text = results.get(r.address, (451, "4.3.0 no answer for this recipient"))
            outcomes.append(self._outcome(r, code, text))
        return outcomes

    def _all(self, claim: Claim, failure: SmtpFailure) -> list[Outcome]:
        return [
            self._outcome(r, failure.code, f"{failure.status} {failure.message}")
            for r in claim.recipients
        ]

    def _outcome(self, recipient: ClaimedRecipient, code: int, text: str) -> Outcome:
        now = self._clock()
        if 200 <= code < 300:
            return Outcome(recipient, RecipientState.DELIVERED, code, text)
        if code >= 500:
            return Outcome(recipient, RecipientState.BOUNCED, code, text)
        if now - recipient.queued_at >= self._config.bounce_after:
            return Outcome(
                recipient,
                RecipientState.BOUNCED,
                code,
                f"{text} (still undelivered after {self._config.bounce_after})",
            )
        return Outcome(
            recipient, RecipientState.DEFERRED, code, text, now + self.backoff(recipient.attempts)
        )

    def backoff(self, attempts: int) -> timedelta:
        """Exponential backoff with ±20 % jitter, so retries after an outage spread out."""
        base = self._config.retry_initial * (2 ** min(attempts, 20))
        capped = min(base, self._config.retry_max)
        jittered: timedelta = capped * self._rng.uniform(0.8, 1.2)
        return jittered

    async def _record(self, claim: Claim, outcomes: Sequence[Outcome]) -> None:
        """Record outcomes in the next bookkeeping commit and wait for it: sends that
        finish while a commit runs share the one after it (one transaction, one turn
        of SQLite's write lock, for what twenty workers finished meanwhile)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._to_record.append(_Pending(claim, outcomes, done))
        self._start_recorder()
        self._awaiting_record += 1
        try:
            await done
        finally:
            self._awaiting_record -= 1

    def _start_recorder(self) -> None:
        if self._recorder is None or self._recorder.done():
            self._recorder = asyncio.get_running_loop().create_task(
                self._record_pending(), name="delivery-recorder"
            )

    async def _record_pending(self) -> None:
        while self._alone or self._to_record:
            if self._alone:
                batch = self._alone[:RECORD_BATCH]
                del self._alone[: len(batch)]
                await self._commit_outcomes(batch)
                continue
            if self._intake_active():
                await self._wait_for_ride()
                if not self._to_record:
                    # Intake's commit carries them. Look again all the same: a ride
                    # may have given outcomes back meanwhile, and with this task alive
                    # no other recorder was started for them.
                    continue
            batch = self._to_record[:RECORD_BATCH]
            del self._to_record[: len(batch)]
            await self._commit_outcomes(batch)

    def _intake_active(self) -> bool:
        since = asyncio.get_running_loop().time() - self._last_intake_commit
        return self._store.is_sqlite and not self._stopping and since < INTAKE_ACTIVE

    async def _wait_for_ride(self) -> None:
        self._ridden.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RIDE_WAIT):
                await self._ridden.wait()

    def _rode(self, batch: Sequence[_Pending], events: list[Event] | None) -> None:
        """An intake commit carried `batch`: settle it, or record it ourselves (a
        batch that failed once in a ride would fail every ride after it, and hold up
        the outcomes behind it; alone, one that cannot be recorded is found and
        failed by itself)."""
        if events is None:
            self._alone.extend(batch)
            self._start_recorder()
            return
        self._recorded(batch, events)

    async def _commit_outcomes(self, batch: Sequence[_Pending]) -> None:
        now = self._clock()
        try:
            events = await self._store.run(
                functools.partial(self._apply, batch=batch, now=now), durable=False
            )
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0].done, error)
                return
            # One claim that cannot be recorded must not fail the others.
            log.warning("recording %d claims failed (%r); retrying singly", len(batch), error)
            for item in batch:
                await self._commit_outcomes([item])
            return
        self._recorded(batch, events)

    def _recorded(self, batch: Sequence[_Pending], events: list[Event]) -> None:
        try:
            for event, fields in events:  # only what was committed reaches the audit log
                self._audit.emit(event, **fields)
                if event == "dsn.queued":
                    self.wake()
        except Exception:  # committed: the recorder must go on with the rest
            log.exception("auditing %d recorded outcomes failed", len(events))
        finally:
            for item in batch:
                _settle(item.done, None)

    def _apply(self, session: Session, batch: Sequence[_Pending], now: datetime) -> list[Event]:
        """Record a batch: in delivery's own transaction, or in a savepoint of an
        intake commit (`Ride`); either way on the store's thread, touching only it."""
        kept = repo.record_outcomes(
            session,
            [
                OutcomeRow(o.recipient.id, o.state, o.code, o.response, o.next_attempt_at)
                for item in batch
                for o in item.outcomes
            ],
            owner=self.owner,
            now=now,
        )
        events: list[Event] = []
        for item in batch:
            claim, bounced = item.claim, []
            for o in item.outcomes:
                if o.recipient.id not in kept:
                    continue  # the lease was lost: another worker's result stands
                events.append(_outcome_event(claim, o))
                if o.state is RecipientState.BOUNCED:
                    bounced.append(Failed(o.recipient.address, o.code, o.response))
            if bounced and claim.mail_from and claim.kind != "dsn":
                events.append(self._queue_dsn(session, claim, bounced, now))
        delivered_to = {
            item.claim.domain
            for item in batch
            for o in item.outcomes
            if o.state is RecipientState.DELIVERED and o.recipient.id in kept
        }
        repo.remember_domains(session, delivered_to, now, known=self._known_domains())
        finished = repo.finish_messages(session, [i.claim.message_id for i in batch], now)
        events.extend((f"message.{state.value}", {"id": mid}) for mid, state in finished)
        if self._after_recorded is not None:
            for item in batch:
                events.extend(self._after_recorded(session, item.claim, now))
        return events

    def _queue_dsn(
        self, session: Session, claim: Claim, bounced: list[Failed], now: datetime
    ) -> Event:
        """A bounce goes back to the sender as a queued message with the null sender,
        so it is durable and retried like any other; a bounce never bounces."""
        dsn = build_dsn(
            reporting_host=self._host,
            original_id=claim.message_id,
            original_from=claim.mail_from,
            original=claim.raw or b"",
            failed=bounced,
            arrival=claim.created_at,
            now=now,
        )
        dsn_id = new_id()
        repo.add_messages(
            session,
            [
                (
                    NewMessage(
                        id=dsn_id,
                        mail_from="",
                        rcpt_tos=[claim.mail_from],
                        raw=dsn,
                        state=MessageState.QUEUED,
                        verdict=Verdict.deliver().model_dump(mode="json"),
                        subject="Undelivered Mail Returned to Sender",
                        kind="dsn",
                    ),
                    now,
                )
            ],
        )
        return "dsn.queued", {
            "id": dsn_id,
            "original": claim.message_id,
            "rcpt": [f.address for f in bounced],
        }


class Ride:
    """Outcomes carried by an intake commit (`gateway.committer.Ride`)."""

    def __init__(self, delivery: Delivery, batch: Sequence[_Pending], now: datetime) -> None:
        self._delivery = delivery
        self._batch = batch
        self._now = now
        self._events: list[Event] | None = None

    def apply(self, session: Session) -> None:
        savepoint = session.begin_nested()
        try:
            events = self._delivery._apply(session, self._batch, self._now)
        except Exception:
            log.warning(
                "recording %d claims with intake's commit failed; recording them alone",
                len(self._batch),
                exc_info=True,
            )
            # Outside the `try`: when SQLite itself rolled the whole transaction back (a
            # full disk, an I/O error), the savepoint is gone and this raises, so the
            # commit fails (451) instead of answering 250 for messages it lost.
            savepoint.rollback()
            return
        savepoint.commit()
        self._events = events

    def settle(self, committed: bool) -> None:
        self._delivery._rode(self._batch, self._events if committed else None)


def _outcome_event(claim: Claim, o: Outcome) -> Event:
    event = {
        RecipientState.DELIVERED: "delivery.sent",
        RecipientState.DEFERRED: "delivery.deferred",
        RecipientState.BOUNCED: "delivery.bounced",
    }[o.state]
    return event, {
        "id": claim.message_id,
        "rcpt": o.recipient.address,
        "code": o.code,
        "response": o.response[:300],
        "attempt": o.recipient.attempts + 1,
        "retry_at": o.next_attempt_at.isoformat() if o.next_attempt_at else None,
    }


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # the worker was cancelled (stop's grace ran out)
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
