"""Domains mail has already been delivered to, for `first_time_recipient_domain`.

The policy engine is pure, so the set is read from the store here and passed in.
"""

from __future__ import annotations

import logging
from typing import Any

from policies.clients import domain_of
from quarantine import repository as repo
from quarantine.db import Store

log = logging.getLogger(__name__)


class KnownDomains:
    """The recipient domains mail has been delivered to, read from the store's
    `known_domains` table (one row per domain) and kept current between reads by
    watching this instance's deliveries; other instances' show at the next read."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.domains: frozenset[str] = frozenset()

    async def refresh(self) -> None:
        try:
            async with self._store.read() as session:
                found = await session.run_sync(repo.known_domains)
        except Exception:
            log.warning("could not refresh known recipient domains; keeping the last set")
            return
        # stored lower-case (a claim's domain), as the policy engine looks them up
        self.domains = frozenset(found) | self.domains

    def observe(self, event: dict[str, Any]) -> None:
        """An audit observer: a domain just delivered to is known from now on."""
        if event.get("event") != "delivery.sent":
            return
        domain = domain_of(str(event.get("rcpt", "")))
        if domain and domain not in self.domains:
            self.domains = self.domains | {domain}  # a new set: readers never see it change

    def current(self) -> frozenset[str]:
        return self.domains
