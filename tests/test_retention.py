"""Retention: bodies of finished mail go after keep_bodies; metadata, audit and
unfinished mail stay; `sekisho purge --dry-run` says what would go and removes nothing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosmtplib
from sqlalchemy import select, update

from gateway.retention import purge
from quarantine.models import Body, Message
from tests.conftest import Upstream, gateway_config, running

HOLD = [{"name": "hold-reports", "when": {"subject_matches": ["report"]}, "action": "hold"}]


async def test_finished_bodies_are_purged_and_the_rest_is_kept(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path, store_url, upstream.port, rules=HOLD, approval={"notify_by_mail": False}
    )
    async with running(config) as gw:
        for subject in ("hello", "report"):
            await aiosmtplib.send(
                f"Subject: {subject}\r\n\r\nbody\r\n".encode(),
                sender="alice@example.com",
                recipients=["b@client.example"],
                hostname="127.0.0.1",
                port=gw.smtp_port,
                start_tls=False,
            )
        await upstream.wait_for(1)
        for _ in range(100):
            async with gw.store.read() as session:
                states = set((await session.scalars(select(Message.state))).all())
            if states == {"delivered", "held"}:
                break
            await asyncio.sleep(0.05)
        assert states == {"delivered", "held"}
        async with gw.store.transaction() as session:  # make everything look 40 days old
            old = datetime.now(UTC) - timedelta(days=40)
            await session.execute(update(Message).values(finished_at=old, updated_at=old))
        now = datetime.now(UTC)
        dry = await purge(gw.store, now, timedelta(days=30), dry_run=True)
        real = await purge(gw.store, now, timedelta(days=30))
        again = await purge(gw.store, now, timedelta(days=30))
        async with gw.store.read() as session:
            rows = (
                await session.execute(
                    select(Message.state, Message.subject, Body.raw).join(
                        Body, Body.message_id == Message.id
                    )
                )
            ).all()
    assert (dry.bodies, real.bodies, again.bodies) == (1, 1, 0)
    kept = {state: (subject, raw) for state, subject, raw in rows}
    assert kept["delivered"] == ("hello", None)  # metadata stays, the body is gone
    assert kept["held"][1] is not None  # unfinished mail is never purged


def test_purge_command_dry_run(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[store]\nurl = "sqlite:///{tmp_path}/s.db"\nkeep_bodies = "30d"\n')
    subprocess.run(
        [sys.executable, "-m", "gateway", "migrate", "--config", str(config)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "purge", "--dry-run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("would purge 0 message bodies")
