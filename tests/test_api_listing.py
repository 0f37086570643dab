"""Listing held mail at scale: what the page costs does not grow with the store."""

from __future__ import annotations

import gc
from pathlib import Path

from gateway.http_api import create_app
from quarantine.db import Store


async def test_the_start_up_heap_is_out_of_the_collectors_reach(tmp_path: Path) -> None:
    """A full collection must not walk what start-up built (a ~100 ms pause every
    ~140 listing requests was the listing's p99)."""
    store = Store(f"sqlite:///{tmp_path / 'sekisho.db'}")
    gc.unfreeze()
    try:
        create_app(store)
        assert gc.get_freeze_count() > 10_000
        assert gc.get_count()[2] == 0  # collected just before, so no garbage was frozen
    finally:
        await store.close()
