"""Approval API latency with a full store (issue 5's targets: < 50 ms for one page of
50 held messages with 100,000 messages stored; < 20 ms to approve, to the point of queued).

Approvals are timed two ways. "One at a time" sends one every 100 ms (an approver
clicking through a queue is slower than that): it is the latency of one approval.
"Back-to-back" sends the next the moment the last is answered, so each approval also
waits for the delivery and the notice the previous one started (on SQLite they share
one write lock, on any store one event loop): it shows where a burst saturates.

    python bench/api.py [--messages 100000] [--store-url postgresql://postgres@127.0.0.1/test]

Seeds the store directly (core inserts), starts a real gateway in-process on loopback,
and times HTTP requests from a client in the same process. Prints p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.app import Gateway
from gateway.cli_tokens import hash_token, new_token
from gateway.config import parse_config
from gateway.ids import new_id
from quarantine import accounts
from quarantine.models import Body, Message, Recipient
from quarantine.states import MessageState, RecipientState

STATES = [MessageState.DELIVERED] * 8 + [MessageState.HELD, MessageState.BOUNCED]
RAW = b"From: alice@example.com\r\nTo: b@client.example\r\nSubject: bench\r\n\r\n" + b"x" * 2000


async def seed(gw: Gateway, count: int) -> None:
    start = datetime.now(UTC) - timedelta(days=30)
    verdict_held = {
        "action": "hold",
        "rule": "personal-data",
        "approvers": ["group:compliance"],
        "reason": "bench",
        "trace": [],
        "min_approvals": 1,
    }
    batch = 5000
    for offset in range(0, count, batch):
        messages, bodies, rcpts = [], [], []
        for n in range(offset, min(count, offset + batch)):
            at = start + timedelta(seconds=n * 20)
            state = STATES[n % len(STATES)]
            mid = new_id(int(at.timestamp() * 1000))
            held = state is MessageState.HELD
            messages.append(
                dict(
                    id=mid,
                    created_at=at,
                    updated_at=at,
                    state=state,
                    kind="message",
                    mail_from="alice@example.com",
                    sender_user="alice",
                    subject=f"bench {n}",
                    size=len(RAW),
                    rule="personal-data" if held else None,
                    verdict=verdict_held if held else {"action": "deliver"},
                    attachments=[],
                    release_at=at + timedelta(days=365) if held else None,
                )
            )
            bodies.append(dict(message_id=mid, raw=RAW))
            rcpts.append(
                dict(
                    message_id=mid,
                    address=f"b{n % 97}@client{n % 13}.example",
                    domain=f"client{n % 13}.example",
                    state=RecipientState.WAITING if held else RecipientState.DELIVERED,
                    attempts=0 if held else 1,
                    updated_at=at,
                )
            )
        async with gw.store.transaction() as session:
            await session.execute(insert(Message), messages)
            await session.execute(insert(Body), bodies)
            await session.execute(insert(Recipient), rcpts)


async def token(gw: Gateway, name: str, role: str, groups: list[str]) -> str:
    value, prefix = new_token()
    now = datetime.now(UTC)
    async with gw.store.transaction() as session:
        await accounts.add_user(
            session,
            name=name,
            password_hash=None,
            role=accounts.Role(role),
            emails=[f"{name}@example.com"],
            groups=groups,
            now=now,
        )
        await accounts.add_token(
            session,
            user=name,
            token_hash=hash_token(value),
            prefix=prefix,
            label=None,
            expires_at=None,
            now=now,
        )
    return value


def curl(
    base: str, token: str, method: str, paths: list[str], rate: str | None = None
) -> list[float]:
    """Time each request with curl over one keep-alive connection: an independent
    client whose figures are the server's, not a Python client's. `rate` ("10/s")
    spaces the requests."""
    out = subprocess.run(
        [
            "curl",
            *(["--rate", rate] if rate else []),
            "-s",
            "--fail-with-body",
            "-X",
            method,
            "-H",
            f"Authorization: Bearer {token}",
            "-w",
            "%{http_code} %{time_total}\n",
            *["-o/dev/null" for _ in paths],
            *[base + p for p in paths],
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) == len(paths) and all(r[0] == "200" for r in rows), out.stdout + out.stderr
    return [float(r[1]) * 1000 for r in rows]


def measure(base: str, admin: str, approver: str, runs: int) -> None:
    listing = "/messages?state=held&limit=50"
    curl(base, admin, "GET", [listing] * 3)  # warm up
    print(line("admin: list one page of 50 held", curl(base, admin, "GET", [listing] * runs)))
    print(line("approver: list one page of 50 held", curl(base, approver, "GET", [listing] * runs)))
    page = subprocess.run(
        [
            "curl",
            "-s",
            "-H",
            f"Authorization: Bearer {approver}",
            base + "/messages?state=held&limit=200",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ids = [item["id"] for item in json.loads(page)["items"]]
    paced, burst = ids[:runs], ids[runs : 2 * runs]
    took = curl(base, approver, "POST", [f"/messages/{m}/approve" for m in paced], rate="10/s")
    print(line(f"approver: approve, one at a time, n={len(took)}", took))
    took = curl(base, approver, "POST", [f"/messages/{m}/approve" for m in burst])
    print(line(f"approver: approve, back-to-back, n={len(took)}", took))


def line(label: str, took: list[float]) -> str:
    took = sorted(took)
    p99 = took[min(len(took) - 1, int(len(took) * 0.99))]
    return f"  {label:<44} p50 {statistics.median(took):7.2f} ms   p99 {p99:7.2f} ms"


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store_url or f"sqlite:///{tmp}/bench.db"
        dropper = None
        if url.startswith("postgresql"):
            url, dropper = await fresh_pg(url)
        config = parse_config(
            {
                "smtp": {"listen": "127.0.0.1:0"},
                "admin": {"listen": "127.0.0.1:0"},
                "store": {"url": url},
                "audit": {"path": f"{tmp}/audit.log"},
                "delivery": {"upstream": f"maildir:{tmp}/out"},
            }
        )
        gw = Gateway(config)
        await gw.start()
        try:
            started = time.perf_counter()
            await seed(gw, args.messages)
            print(
                f"seeded {args.messages} messages in {time.perf_counter() - started:.1f} s "
                f"({url.split(':')[0]})"
            )
            admin = await token(gw, "root", "admin", [])
            approver = await token(gw, "boss", "approver", ["compliance"])
            base = f"http://127.0.0.1:{gw.http_port}/api/v1"
            await asyncio.to_thread(measure, base, admin, approver, args.runs)
        finally:
            await gw.stop(grace=1)
            if dropper:
                await dropper()


async def fresh_pg(url: str) -> tuple[str, object]:
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(url)
    name = f"sekisho_bench_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(
        host=base.host,
        port=base.port or 5432,
        user=base.username or "postgres",
        database=base.database,
    )
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()

    async def drop() -> None:
        c = await asyncpg.connect(
            host=base.host,
            port=base.port or 5432,
            user=base.username or "postgres",
            database=base.database,
        )
        await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await c.close()

    return base.set(database=name).render_as_string(hide_password=False), drop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--store-url", help="default: a temporary SQLite file")
    asyncio.run(main(parser.parse_args()))
