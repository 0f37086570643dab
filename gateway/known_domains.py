"""Domains mail has already been delivered to, for `first_time_recipient_domain`.

The policy engine is pure, so the set is read from the store here and passed in.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from quarantine.db import Store
from quarantine.models import Recipient
from quarantine.states import RecipientState

log = logging.getLogger(__name__)
LIMIT = 200_000


class KnownDomains:
    def __init__(self, store: Store) -> None:
        self._store = store
        self.domains: frozenset[str] = frozenset()

    async def refresh(self) -> None:
        try:
            async with self._store.read() as session:
                rows = await session.scalars(
                    select(Recipient.domain)
                    .where(Recipient.state == RecipientState.DELIVERED)
                    .distinct()
                    .limit(LIMIT)
                )
                # lower-case for the policy engine (`domain_of` stored them so already)
                self.domains = frozenset(d.lower() for d in rows.all())
        except Exception:
            log.warning("could not refresh known recipient domains; keeping the last set")

    def current(self) -> frozenset[str]:
        return self.domains
