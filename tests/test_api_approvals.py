"""Deciding held and delayed mail over /api/v1, end to end: SMTP in, HTTP decision,
what the upstream receives, and what the store and the audit log say."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from gateway.approvals import expire_holds
from gateway.config import Config
from quarantine.models import Message, Recipient
from tests.api_support import (
    HOLD_FOR_COMPLIANCE,
    Clock,
    audit_events,
    client,
    message,
    person,
    send,
)
from tests.conftest import Upstream, gateway_config, running

DELAY_5M: dict[str, Any] = {
    "name": "delay-all",
    "when": {"has_attachments": False},
    "action": "delay",
    "delay": "5m",
}


def _config(tmp_path: Path, url: str, port: int, rule: dict[str, Any], **approval: Any) -> Config:
    return gateway_config(
        tmp_path,
        url,
        port,
        rules=[rule],  # type: ignore[arg-type]
        # notices by mail are tested in test_workflow_notices; here only the message counts
        approval={"notify_by_mail": False, **approval},
    )


async def _state(gw: Any, message_id: str) -> tuple[str, list[str]]:
    async with gw.store.read() as session:
        stored = await session.get(Message, message_id)
        recipients = (
            await session.scalars(select(Recipient.state).where(Recipient.message_id == message_id))
        ).all()
    assert stored is not None
    return str(stored.state), [str(r) for r in recipients]


async def test_approve_releases_the_message_and_the_upstream_receives_it_unchanged(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    raw = message("ご確認ください。\r\n")
    async with running(_config(tmp_path, sqlite_url, upstream.port, HOLD_FOR_COMPLIANCE)) as gw:
        bob = await person(gw, "bob", "approver", groups=["compliance"])
        held = await send(gw, raw)
        await asyncio.sleep(0.2)
        assert upstream.received == []
        async with client(gw, bob) as http:
            approved = await http.post(f"/messages/{held}/approve", json={"comment": "OK です"})
        received = await upstream.wait_for(1)
        async with client(gw, bob) as http:
            detail = (await http.get(f"/messages/{held}")).json()
        approvals = audit_events(gw, "message.approved")
        released = audit_events(gw, "message.released")
    assert approved.status_code == 200, approved.text
    assert approved.json() == {
        "id": held,
        "state": "queued",
        "approvals": 1,
        "min_approvals": 1,
        "released": True,
        "already": False,
    }
    assert [(r.rcpt_tos, r.data) for r in received] == [(["buyer@client.example"], raw)]
    assert [(d["user"], d["decision"], d["comment"]) for d in detail["decisions"]] == [
        ("bob", "approve", "OK です")
    ]
    assert [(e["id"], e["actor"]) for e in approvals] == [(held, "bob")]
    assert [(e["id"], e["actor"], e["reason"]) for e in released] == [(held, "bob", "approved")]


async def test_reject_ends_the_message_and_a_later_approve_learns_who_rejected(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    async with running(_config(tmp_path, sqlite_url, upstream.port, HOLD_FOR_COMPLIANCE)) as gw:
        bob = await person(gw, "bob", "approver", groups=["compliance"])
        carol = await person(gw, "carol", "approver", groups=["compliance"])
        held = await send(gw, message())
        async with client(gw, bob) as http:
            rejected = await http.post(
                f"/messages/{held}/reject", json={"reason": "宛先違い / wrong client"}
            )
        async with client(gw, carol) as http:
            late = await http.post(f"/messages/{held}/approve")
        await asyncio.sleep(0.2)
        state = await _state(gw, held)
        events = audit_events(gw, "message.rejected")
    assert rejected.status_code == 200 and rejected.json()["state"] == "rejected"
    assert state == ("rejected", ["cancelled"])
    assert late.status_code == 409 and "rejected (by bob at" in late.json()["detail"]
    assert [(e["actor"], e["reason"]) for e in events] == [("bob", "宛先違い / wrong client")]
    assert upstream.received == []


async def test_four_eyes_the_sender_can_never_approve_their_own_message(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    async with running(_config(tmp_path, sqlite_url, upstream.port, HOLD_FOR_COMPLIANCE)) as gw:
        alice = await person(
            gw, "alice", "approver", emails=["alice@example.com"], groups=["compliance"]
        )
        admin = await person(gw, "root", "admin", emails=["root@example.com"])
        own = await send(gw, message())
        admins_own = await send(gw, message(sender="root@example.com"), "root@example.com")
        async with client(gw, alice) as http:
            refused = await http.post(f"/messages/{own}/approve")
        async with client(gw, admin) as http:
            also_refused = await http.post(f"/messages/{admins_own}/approve")
        state = await _state(gw, own)
    assert refused.status_code == 403 and "four-eyes" in refused.json()["detail"]
    assert also_refused.status_code == 403
    assert state == ("held", ["waiting"])


async def test_min_approvals_two_counts_distinct_people_not_the_same_person_twice(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    rule = {**HOLD_FOR_COMPLIANCE, "min_approvals": 2}
    async with running(_config(tmp_path, sqlite_url, upstream.port, rule)) as gw:
        bob = await person(gw, "bob", "approver", groups=["compliance"])
        carol = await person(gw, "carol", "approver", groups=["compliance"])
        held = await send(gw, message())
        async with client(gw, bob) as http:
            first = await http.post(f"/messages/{held}/approve")
            again = await http.post(f"/messages/{held}/approve", json={"comment": "again"})
        await asyncio.sleep(0.2)
        still = await _state(gw, held)
        async with client(gw, carol) as http:
            second = await http.post(f"/messages/{held}/approve")
        received = await upstream.wait_for(1)
        async with client(gw, bob) as http:
            after = await http.post(f"/messages/{held}/approve")
    assert (first.json()["approvals"], first.json()["released"]) == (1, False)
    assert (again.json()["approvals"], again.json()["already"]) == (1, True)
    assert still == ("held", ["waiting"])
    assert (second.json()["approvals"], second.json()["released"]) == (2, True)
    assert len(received) == 1
    assert after.status_code == 200 and after.json()["already"] is True


async def test_two_approvers_at_once_release_the_message_once(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    async with running(_config(tmp_path, store_url, upstream.port, HOLD_FOR_COMPLIANCE)) as gw:
        tokens = [
            await person(gw, name, "approver", groups=["compliance"]) for name in ("bob", "carol")
        ]
        held = [await send(gw, message()) for _ in range(5)]
        clients = [client(gw, t) for t in tokens]
        answers = []
        for message_id in held:
            answers.append(
                await asyncio.gather(*(c.post(f"/messages/{message_id}/approve") for c in clients))
            )
        for c in clients:
            await c.aclose()
        await upstream.wait_for(len(held))
        await asyncio.sleep(0.5)
        released = audit_events(gw, "message.released")
    assert len(upstream.received) == len(held)
    assert sorted(e["id"] for e in released) == sorted(held)
    for pair in answers:
        assert sorted(a.status_code for a in pair) == [200, 409]
        winner = next(a for a in pair if a.status_code == 200).json()
        loser = next(a for a in pair if a.status_code == 409).json()
        assert winner["released"] is True
        assert "already queued (by " in loser["detail"]


async def test_sender_cancels_during_the_delay_window_and_gets_409_after_it(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    clock = Clock()
    config = _config(tmp_path, sqlite_url, upstream.port, DELAY_5M)
    async with running(config, clock=clock) as gw:
        alice = await person(gw, "alice", "sender", emails=["alice@example.com"])
        carol = await person(gw, "carol", "sender", emails=["carol@example.com"])
        cancelled = await send(gw, message())
        late = await send(gw, message())
        async with client(gw, carol) as http:
            not_hers = await http.post(f"/messages/{cancelled}/cancel")
        clock.advance(timedelta(minutes=4))
        async with client(gw, alice) as http:
            in_window = await http.post(f"/messages/{cancelled}/cancel")
            clock.advance(timedelta(minutes=2))
            after_window = await http.post(f"/messages/{late}/cancel")
        received = await upstream.wait_for(1)
        await asyncio.sleep(0.2)
        states = [await _state(gw, m) for m in (cancelled, late)]
    assert not_hers.status_code == 404
    assert in_window.status_code == 200 and in_window.json()["state"] == "cancelled"
    assert after_window.status_code == 409
    assert states[0] == ("cancelled", ["cancelled"])
    assert states[1][0] in ("queued", "delivered")
    assert len(received) == 1


async def test_release_now_sends_a_delayed_message_before_its_window_ends(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    clock = Clock()
    async with running(_config(tmp_path, sqlite_url, upstream.port, DELAY_5M), clock=clock) as gw:
        alice = await person(gw, "alice", "sender", emails=["alice@example.com"])
        erin = await person(gw, "erin", "admin")
        delayed = await send(gw, message())
        async with client(gw, alice) as http:
            sender_tries = await http.post(f"/messages/{delayed}/release-now")
        async with client(gw, erin) as http:
            released = await http.post(f"/messages/{delayed}/release-now")
            cancel_after = await http.post(f"/messages/{delayed}/cancel")
        received = await upstream.wait_for(1)
    assert sender_tries.status_code == 403
    assert released.status_code == 200 and released.json()["state"] == "queued"
    assert cancel_after.status_code == 409
    assert len(received) == 1


async def test_expired_holds_are_rejected_by_default_from_the_stored_timestamps(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    clock = Clock()
    config = _config(tmp_path, sqlite_url, upstream.port, HOLD_FOR_COMPLIANCE, expire_after="3d")
    async with running(config, clock=clock) as gw:
        held = await send(gw, message())
        early = await expire_holds(gw.store, clock.now + timedelta(days=2), config.approval)
        later = await expire_holds(gw.store, clock.now + timedelta(days=3), config.approval)
        again = await expire_holds(gw.store, clock.now + timedelta(days=4), config.approval)
        state = await _state(gw, held)
    assert early == [] and again == []
    assert [(d.message_id, d.outcome) for d in later] == [(held, "expired")]
    assert state == ("expired", ["cancelled"])
    assert upstream.received == []


async def test_expired_holds_are_released_when_on_expire_says_release(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    clock = Clock()
    config = _config(
        tmp_path,
        sqlite_url,
        upstream.port,
        HOLD_FOR_COMPLIANCE,
        expire_after="1d",
        on_expire="release",
    )
    async with running(config, clock=clock) as gw:
        raw = message()
        held = await send(gw, raw)
        clock.advance(timedelta(days=1, seconds=1))
        assert gw.delivery is not None
        done = await expire_holds(gw.store, clock(), config.approval, wake=gw.delivery.wake)
        received = await upstream.wait_for(1)
    assert [(d.message_id, d.outcome) for d in done] == [(held, "released")]
    assert [r.data for r in received] == [raw]


async def test_escalation_adds_the_escalate_to_groups_after_escalate_after(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    clock = Clock()
    config = _config(
        tmp_path,
        sqlite_url,
        upstream.port,
        HOLD_FOR_COMPLIANCE,
        escalate_after="4h",
        escalate_to=["group:managers"],
    )
    async with running(config, clock=clock) as gw:
        mona = await person(gw, "mona", "approver", groups=["managers"])
        held = await send(gw, message())
        async with client(gw, mona) as http:
            before = await http.get(f"/messages/{held}")
            clock.advance(timedelta(hours=4))
            listed = (await http.get("/messages", params={"state": "held"})).json()["items"]
            approved = await http.post(f"/messages/{held}/approve")
        await upstream.wait_for(1)
    assert before.status_code == 404
    assert [(m["id"], m["deciders"]) for m in listed] == [
        (held, ["group:compliance", "group:managers"])
    ]
    assert listed[0]["waited_seconds"] >= 4 * 3600
    assert approved.status_code == 200


SENDER_MAY_RELEASE: dict[str, Any] = {**DELAY_5M, "sender_may_release": True}


async def test_sender_releases_now_where_the_delaying_rule_allows_it(
    tmp_path: Path, store_url: str, upstream: Upstream
) -> None:
    config = _config(tmp_path, store_url, upstream.port, SENDER_MAY_RELEASE)
    async with running(config, clock=Clock()) as gw:
        alice = await person(gw, "alice", "sender", emails=["alice@example.com"])
        carol = await person(gw, "carol", "sender", emails=["carol@example.com"])
        delayed = await send(gw, message())
        async with client(gw, carol) as http:
            not_hers = await http.post(f"/messages/{delayed}/release-now")
        async with client(gw, alice) as http:
            released = await http.post(f"/messages/{delayed}/release-now")
            again = await http.post(f"/messages/{delayed}/release-now")
        received = await upstream.wait_for(1)
        events = audit_events(gw, "message.released")
    assert not_hers.status_code == 404
    assert released.status_code == 200 and released.json()["state"] == "queued"
    assert again.status_code == 409
    assert [r.rcpt_tos for r in received] == [["buyer@client.example"]]
    assert [(e["id"], e["actor"], e["reason"]) for e in events] == [
        (delayed, "alice", "released-now")
    ]


async def test_sender_may_not_release_when_one_delaying_rule_keeps_its_window(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    keeps = {**DELAY_5M, "name": "delay-keeps-window", "delay": "10m"}
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        rules=[SENDER_MAY_RELEASE, keeps],  # type: ignore[arg-type]
        approval={"notify_by_mail": False},
    )
    async with running(config, clock=Clock()) as gw:
        alice = await person(gw, "alice", "sender", emails=["alice@example.com"])
        delayed = await send(gw, message())
        async with client(gw, alice) as http:
            refused = await http.post(f"/messages/{delayed}/release-now")
        await asyncio.sleep(0.2)
        state = await _state(gw, delayed)
    assert refused.status_code == 403 and "rule" in refused.json()["detail"]
    assert state == ("delayed", ["waiting"])
    assert upstream.received == []


async def test_sender_never_releases_held_mail_even_where_a_delay_rule_allows_it(
    tmp_path: Path, sqlite_url: str, upstream: Upstream
) -> None:
    config = gateway_config(
        tmp_path,
        sqlite_url,
        upstream.port,
        rules=[SENDER_MAY_RELEASE, HOLD_FOR_COMPLIANCE],  # type: ignore[arg-type]
        approval={"notify_by_mail": False},
    )
    async with running(config, clock=Clock()) as gw:
        alice = await person(gw, "alice", "sender", emails=["alice@example.com"])
        held = await send(gw, message())
        delayed_then_held = await send(gw, message())
        # A delayed message that delivery later held (protection failed): its verdict
        # still allows the sender, its state does not.
        async with gw.store.transaction() as session:
            row = await session.get(Message, delayed_then_held)
            assert row is not None
            row.verdict = {**row.verdict, "action": "delay", "sender_may_release": True}
        async with client(gw, alice) as http:
            on_held = await http.post(f"/messages/{held}/release-now")
            on_held_later = await http.post(f"/messages/{delayed_then_held}/release-now")
        await asyncio.sleep(0.2)
        states = [await _state(gw, m) for m in (held, delayed_then_held)]
    assert on_held.status_code == 403
    assert (
        on_held_later.status_code == 409 and "approve it instead" in on_held_later.json()["detail"]
    )
    assert states == [("held", ["waiting"]), ("held", ["waiting"])]
    assert upstream.received == []
