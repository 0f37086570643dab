"""Prometheus metrics. Counters follow the audit log (every step is an audit event,
so nothing on the hot path needs a metrics call of its own); gauges about the store
are read when scraped."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from sqlalchemy import func, select, text

from gateway.ids import created_ms
from quarantine import repository as repo
from quarantine.db import Store
from quarantine.models import Message
from quarantine.states import MessageState

WAIT_BUCKETS = (60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0)
DELIVERY_EVENTS = {
    "delivery.sent": "sent",
    "delivery.deferred": "deferred",
    "delivery.bounced": "bounced",
}
DECIDED_EVENTS = {"message.released", "message.rejected", "message.expired"}
REFUSAL_EVENTS = {"message.refused", "auth.failed", "auth.sender_mismatch", "message.tempfail"}


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime],
        active_sessions: Callable[[], int] = lambda: 0,
    ) -> None:
        self._store = store
        self._clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Gauge(
            "sekisho_messages", "Messages in the store by state", ["state"], registry=r
        )
        self.deliveries = Counter(
            "sekisho_deliveries",
            "Recipient outcomes by upstream reply class",
            ["result", "code_class"],
            registry=r,
        )
        self.verdicts = Counter(
            "sekisho_verdicts",
            "Messages by deciding rule and what became of them",
            ["rule", "state"],
            registry=r,
        )
        self.refusals = Counter(
            "sekisho_smtp_refusals", "SMTP refusals by reason", ["reason"], registry=r
        )
        self.accepted = Counter("sekisho_smtp_accepted", "Messages answered 250", registry=r)
        self.sessions = Gauge("sekisho_smtp_sessions", "Open SMTP sessions", registry=r)
        self.sessions.set_function(lambda: float(active_sessions()))
        self.held_wait = Histogram(
            "sekisho_held_wait_seconds",
            "How long held or delayed mail waited until released, rejected or expired",
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge(
            "sekisho_held_waiting",
            "Held messages waiting longer than `le` seconds",
            ["le"],
            registry=r,
        )
        self.store_latency = Gauge(
            "sekisho_store_ping_seconds", "Round trip of a trivial query to the store", registry=r
        )

    def observe(self, event: dict[str, Any]) -> None:
        """An audit observer: count the step an event records."""
        name = str(event.get("event"))
        if name in DELIVERY_EVENTS:
            code = event.get("code")
            code_class = f"{str(code)[0]}xx" if code else "none"
            self.deliveries.labels(DELIVERY_EVENTS[name], code_class).inc()
        elif name == "message.accepted":
            self.accepted.inc()
            self.verdicts.labels(str(event.get("rule") or "-"), str(event.get("state"))).inc()
        elif name in REFUSAL_EVENTS:
            reason = str(event.get("rule") or event.get("reason") or name)
            self.refusals.labels(reason).inc()
            if name == "message.refused":
                self.verdicts.labels(str(event.get("rule") or "-"), "refused").inc()
        elif name in DECIDED_EVENTS:
            # Ids carry their creation time, so the wait needs no lookup.
            created = created_ms(str(event.get("id") or ""))
            if created is not None:
                waited = self._clock().timestamp() - created / 1000
                self.held_wait.observe(max(0.0, waited))

    async def render(self) -> bytes:
        started = time.perf_counter()
        async with self._store.read() as session:
            await session.execute(text("SELECT 1"))
            self.store_latency.set(time.perf_counter() - started)
            counts = await repo.queue_depth(session)
            for state in MessageState:  # an emptied state must fall to 0, not keep its count
                self.messages.labels(state=state.value).set(counts.get(state.value, 0))
            await self._held_ages(session)
        return generate_latest(self.registry)

    async def _held_ages(self, session: Any) -> None:
        now = self._clock()
        for bucket in WAIT_BUCKETS:
            count = await session.scalar(
                select(func.count())
                .select_from(Message)
                .where(
                    Message.state == MessageState.HELD,
                    Message.created_at <= now - timedelta(seconds=bucket),
                )
            )
            self.waiting.labels(le=f"{bucket:g}").set(count or 0)
