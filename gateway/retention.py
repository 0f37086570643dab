"""Retention: message bodies of finished mail are purged after `[store].keep_bodies`.

Personal data should not live forever. What is kept: the metadata (envelope,
subject, verdict and trace, per-recipient results) and the audit log. Per-message
ZIP passwords of finished mail go at the same time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, func, select, update

from gateway.audit import AuditLog
from quarantine.db import Store
from quarantine.models import Body, Message, MessageKey
from quarantine.states import MessageState

log = logging.getLogger(__name__)

FINISHED = (
    MessageState.DELIVERED,
    MessageState.BOUNCED,
    MessageState.REJECTED,
    MessageState.CANCELLED,
    MessageState.EXPIRED,
)
PURGE_EVERY = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class PurgeReport:
    bodies: int
    bytes: int
    keys: int


def _finished_before(cutoff: datetime) -> Select[Any]:
    return select(Message.id).where(
        Message.state.in_(FINISHED),
        func.coalesce(Message.finished_at, Message.updated_at) < cutoff,
    )


async def purge(
    store: Store, now: datetime, keep: timedelta, *, dry_run: bool = False
) -> PurgeReport:
    cutoff = now - keep
    old = _finished_before(cutoff)
    async with store.transaction() as session:
        bodies, size = (
            await session.execute(
                select(func.count(), func.coalesce(func.sum(func.length(Body.raw)), 0)).where(
                    Body.message_id.in_(old), Body.raw.is_not(None)
                )
            )
        ).one()
        keys = await session.scalar(
            select(func.count()).select_from(MessageKey).where(MessageKey.message_id.in_(old))
        )
        if not dry_run:
            await session.execute(
                update(Body).where(Body.message_id.in_(old), Body.raw.is_not(None)).values(raw=None)
            )
            await session.execute(delete(MessageKey).where(MessageKey.message_id.in_(old)))
    return PurgeReport(int(bodies), int(size), int(keys or 0))


async def retention_loop(
    store: Store, keep: timedelta, clock: Callable[[], datetime], audit: AuditLog
) -> None:
    while True:
        try:
            report = await purge(store, clock(), keep)
            if report.bodies or report.keys:
                audit.emit(
                    "retention.purged",
                    bodies=report.bodies,
                    bytes=report.bytes,
                    keys=report.keys,
                    older_than=str(keep),
                )
        except Exception:
            log.exception("retention purge failed; will try again")
        await asyncio.sleep(PURGE_EVERY.total_seconds())
