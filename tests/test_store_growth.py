"""The hot path costs the same with a long history or a deep backlog in the store.

SQLite keeps no statistics, so its planner picks an index by the shape of a query
alone. Twice it picked the (state, next_attempt_at) index over the row's own keys:
finishing a message walked every delivered recipient ever stored (a relay's CPU per
message doubled in 16,000 messages), and recording outcomes walked every queued
recipient, all of a backlog. These tests count SQLite's virtual-machine steps, which
do not depend on the machine's speed, for the same work in a small and a large store.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from quarantine import repository as repo
from quarantine.db import Store
from quarantine.migrate import upgrade
from quarantine.repository import Claim, Lease, OutcomeRow
from quarantine.states import RecipientState
from tests.conftest import queued

NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)
HISTORY = 2000
STEP = 10  # SQLite calls the counter every STEP virtual-machine instructions


def _steps(session: Session, work: Callable[[Session], object]) -> int:
    """SQLite instructions (in units of STEP) that `work` runs on this session."""
    sqlite: Any = session.connection().connection.driver_connection
    count = 0

    def tick() -> int:
        nonlocal count
        count += 1
        return 0  # go on

    sqlite.set_progress_handler(tick, STEP)
    try:
        work(session)
    finally:
        sqlite.set_progress_handler(None, STEP)
    return count


def _leased(session: Session, prefix: str, count: int, owner: str = "gw") -> list[Claim]:
    """`count` accepted messages of one recipient each, leased to `owner` on insert."""
    batch = [(queued(f"{prefix}{n}", f"rcpt{n}@client.example"), NOW) for n in range(count)]
    lease = Lease(owner, NOW + timedelta(minutes=5), {new.id for new, _ in batch})
    return repo.add_messages(session, batch, lease)


def _delivered(claims: list[Claim]) -> list[OutcomeRow]:
    return [
        OutcomeRow(r.id, RecipientState.DELIVERED, 250, "2.0.0 ok")
        for claim in claims
        for r in claim.recipients
    ]


def _deliver(session: Session, claims: list[Claim]) -> None:
    """What delivery does with a batch of sent claims: record, then finish."""
    repo.record_outcomes(session, _delivered(claims), owner="gw", now=NOW)
    moved = repo.finish_messages(session, [claim.message_id for claim in claims], NOW)
    assert len(moved) == len(claims)


async def _store(url: str, setup: Callable[[Session], object] | None) -> Store:
    store = Store(url)
    await upgrade(store)
    if setup is not None:
        await store.run(setup)
    return store


async def _finishing_steps(url: str, history: int) -> int:
    def sent_long_ago(session: Session) -> None:
        for start in range(0, history, 500):
            _deliver(session, _leased(session, f"old{start}-", min(500, history - start)))

    store = await _store(url, sent_long_ago if history else None)
    try:
        claims = await store.run(lambda session: _leased(session, "new", 1))
        await store.run(
            lambda session: repo.record_outcomes(session, _delivered(claims), owner="gw", now=NOW)
        )
        return await store.run(
            lambda session: _steps(
                session, lambda s: repo.finish_messages(s, [claims[0].message_id], NOW)
            )
        )
    finally:
        await store.close()


async def test_finishing_a_message_costs_the_same_after_thousands_delivered(
    tmp_path: Any,
) -> None:
    empty = await _finishing_steps(f"sqlite:///{tmp_path / 'empty.db'}", 0)
    full = await _finishing_steps(f"sqlite:///{tmp_path / 'full.db'}", HISTORY)
    # Walking the delivered recipients costs several steps for each of the 2,000.
    assert full < 2 * empty + 20, (empty, full)


async def _recording_steps(url: str, backlog: int) -> int:
    def waiting_behind_a_dead_upstream(session: Session) -> None:
        batch = [(queued(f"due{n}", f"rcpt{n}@slow.example"), NOW) for n in range(backlog)]
        repo.add_messages(session, batch)

    store = await _store(url, waiting_behind_a_dead_upstream if backlog else None)
    try:
        claims = await store.run(lambda session: _leased(session, "sent", 30))
        rows = _delivered(claims)
        return await store.run(
            lambda session: _steps(
                session, lambda s: repo.record_outcomes(s, rows, owner="gw", now=NOW)
            ),
            durable=False,
        )
    finally:
        await store.close()


async def test_recording_outcomes_costs_the_same_behind_a_backlog(tmp_path: Any) -> None:
    empty = await _recording_steps(f"sqlite:///{tmp_path / 'empty.db'}", 0)
    full = await _recording_steps(f"sqlite:///{tmp_path / 'full.db'}", HISTORY)
    assert full < 2 * empty + 20, (empty, full)
