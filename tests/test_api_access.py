"""Who may see what over /api/v1, and how the API treats bad tokens, ids and bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from quarantine import accounts
from tests.api_support import (
    HOLD_FOR_COMPLIANCE,
    audit_events,
    client,
    message,
    person,
    send,
)
from tests.conftest import gateway_config, running

CARD = "4111 1111 1111 1111"


def _config(tmp_path: Path, url: str, **approval: object):  # type: ignore[no-untyped-def]
    return gateway_config(
        tmp_path,
        url,
        None,
        rules=[HOLD_FOR_COMPLIANCE],  # type: ignore[arg-type]
        # notices by mail would add the gateway's own mail to admins' lists; they are
        # tested in test_workflow_notices
        approval={"default_approvers": ["group:approvers"], "notify_by_mail": False, **approval},
    )


async def test_each_role_sees_only_what_it_may_and_others_messages_are_404(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with running(_config(tmp_path, sqlite_url)) as gw:
        alice = await person(gw, "alice", "sender", emails=["alice@example.com"])
        carol = await person(gw, "carol", "sender", emails=["carol@example.com"])
        bob = await person(gw, "bob", "approver", groups=["compliance"])
        dave = await person(gw, "dave", "approver", groups=["sales"])
        erin = await person(gw, "erin", "admin")
        frank = await person(gw, "frank", "auditor")
        mine = await send(gw, message(), "alice@example.com")
        theirs = await send(gw, message(sender="carol@example.com"), "carol@example.com")
        seen = {}
        for name, token in [
            ("alice", alice),
            ("carol", carol),
            ("bob", bob),
            ("dave", dave),
            ("erin", erin),
            ("frank", frank),
        ]:
            async with client(gw, token) as http:
                listed = await http.get("/messages")
                assert listed.status_code == 200, listed.text
                seen[name] = [m["id"] for m in listed.json()["items"]]
        async with client(gw, alice) as http:
            other = await http.get(f"/messages/{theirs}")
            own = await http.get(f"/messages/{mine}")
        async with client(gw, dave) as http:
            not_his = await http.get(f"/messages/{mine}")
    assert seen == {
        "alice": [mine],
        "carol": [theirs],
        "bob": [mine, theirs],
        "dave": [],
        "erin": [mine, theirs],
        "frank": [mine, theirs],
    }
    assert other.status_code == 404 and other.json() == {"detail": "no such message"}
    assert not_his.status_code == 404
    assert own.status_code == 200
    body = own.json()
    assert body["state"] == "held" and body["deciders"] == ["group:compliance"]
    assert [r["address"] for r in body["recipients"]] == ["buyer@client.example"]
    assert body["verdict"]["rule"] == "hold-all" and body["verdict"]["trace"]


async def test_default_approvers_decide_when_the_rule_names_none(
    tmp_path: Path, sqlite_url: str
) -> None:
    rule = {"name": "hold-unnamed", "when": {"has_attachments": False}, "action": "hold"}
    config = gateway_config(
        tmp_path,
        sqlite_url,
        None,
        rules=[rule],  # type: ignore[arg-type]
        approval={"default_approvers": ["group:approvers"]},
    )
    async with running(config) as gw:
        gina = await person(gw, "gina", "approver", groups=["approvers"])
        bob = await person(gw, "bob", "approver", groups=["compliance"])
        held = await send(gw, message())
        async with client(gw, gina) as http:
            listed = (await http.get("/messages")).json()["items"]
        async with client(gw, bob) as http:
            hidden = await http.get(f"/messages/{held}")
    assert [(m["id"], m["deciders"]) for m in listed] == [(held, ["group:approvers"])]
    assert listed[0]["waited_seconds"] >= 0
    assert hidden.status_code == 404


async def test_preview_is_masked_unmask_is_refused_to_senders_and_every_read_is_audited(
    tmp_path: Path, sqlite_url: str
) -> None:
    raw = message(f"カード番号: {CARD}\r\nよろしくお願いします。\r\n")
    async with running(_config(tmp_path, sqlite_url)) as gw:
        alice = await person(gw, "alice", "sender", emails=["alice@example.com"])
        bob = await person(gw, "bob", "approver", groups=["compliance"])
        held = await send(gw, raw)
        async with client(gw, alice) as http:
            masked = await http.get(f"/messages/{held}")
            unmask_denied = await http.get(f"/messages/{held}", params={"unmask": "true"})
            raw_denied = await http.get(f"/messages/{held}/raw")
        async with client(gw, bob) as http:
            unmasked = await http.get(f"/messages/{held}", params={"unmask": "true"})
            download = await http.get(f"/messages/{held}/raw")
        viewed = audit_events(gw, "message.viewed")
        downloaded = audit_events(gw, "message.downloaded")
        log_text = Path(gw.config.audit.path).read_text(encoding="utf-8")
    assert masked.status_code == 200
    assert "4111" not in masked.json()["preview"] and "****" in masked.json()["preview"]
    assert masked.json()["masked"] is True
    assert unmask_denied.status_code == 403 and "role" in unmask_denied.json()["detail"]
    assert raw_denied.status_code == 403
    assert CARD in unmasked.json()["preview"] and unmasked.json()["masked"] is False
    assert download.status_code == 200 and download.content == raw
    assert download.headers["content-type"].startswith("message/rfc822")
    assert [(e["id"], e["actor"], e["unmasked"], e["client"]) for e in viewed] == [
        (held, "alice", False, "127.0.0.1"),
        (held, "bob", True, "127.0.0.1"),
    ]
    assert [(e["id"], e["actor"], e["client"]) for e in downloaded] == [(held, "bob", "127.0.0.1")]
    assert CARD not in log_text and "skt_" not in log_text


async def test_token_in_the_query_string_is_refused(tmp_path: Path, sqlite_url: str) -> None:
    async with running(_config(tmp_path, sqlite_url)) as gw:
        erin = await person(gw, "erin", "admin")
        async with client(gw) as http:
            by_name = await http.get("/messages", params={"access_token": erin})
            by_value = await http.get("/messages", params={"state": erin})
            both = await http.get(
                "/messages", params={"token": erin}, headers={"Authorization": f"Bearer {erin}"}
            )
    for answer in (by_name, by_value, both):
        assert answer.status_code == 400
        assert "Authorization header" in answer.json()["detail"]


async def test_unknown_revoked_and_expired_tokens_get_401(tmp_path: Path, sqlite_url: str) -> None:
    async with running(_config(tmp_path, sqlite_url)) as gw:
        valid = await person(gw, "erin", "admin")
        expired = await person(
            gw, "old", "admin", expires_at=datetime.now(UTC) - timedelta(minutes=1)
        )
        revoked = await person(gw, "gone", "admin")
        async with gw.store.transaction() as session:
            await accounts.revoke_token(session, revoked[:12], datetime.now(UTC))
        answers = {}
        for name, token in [
            ("none", None),
            ("unknown", "skt_" + "x" * 43),
            ("expired", expired),
            ("revoked", revoked),
            ("valid", valid),
        ]:
            async with client(gw, token) as http:
                answers[name] = await http.get("/messages")
    assert {k: a.status_code for k, a in answers.items()} == {
        "none": 401,
        "unknown": 401,
        "expired": 401,
        "revoked": 401,
        "valid": 200,
    }
    assert answers["revoked"].headers["www-authenticate"] == "Bearer"
    assert "detail" in answers["expired"].json()


async def test_repeated_failures_from_one_address_are_slowed_down(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with running(_config(tmp_path, sqlite_url)) as gw:
        valid = await person(gw, "erin", "admin")
        async with client(gw, "skt_guess") as http:
            guesses = [(await http.get("/messages")).status_code for _ in range(10)]
            blocked = await http.get("/messages")
        async with client(gw, valid) as http:
            also_blocked = await http.get("/messages")
    assert guesses == [401] * 10
    assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
    assert also_blocked.status_code == 429  # a right guess after many wrong ones gains nothing
    assert "detail" in blocked.json()


async def test_path_traversal_and_malformed_ids_answer_json_not_500(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with running(_config(tmp_path, sqlite_url)) as gw:
        erin = await person(gw, "erin", "admin")
        async with client(gw, erin) as http:
            answers = [
                await http.get(path)
                for path in (
                    "/messages/..%2F..%2Fetc%2Fpasswd",
                    "/messages/%2e%2e",
                    "/messages/short",
                    "/messages/" + "z" * 300,
                    "/messages/ILOU" + "0" * 18,  # right length, letters ids never use
                    "/messages/" + "0" * 22 + "/raw",  # well-formed, unknown
                    "/messages?cursor=../../x",
                    "/messages?limit=0",
                    "/messages?since=yesterday",
                )
            ]
            decide = await http.post("/messages/..%2Fx/approve")
    assert [a.status_code for a in answers] == [404, 404, 404, 404, 404, 404, 422, 422, 422]
    assert decide.status_code == 404
    assert all("detail" in a.json() for a in [*answers, decide])


async def test_bad_json_and_unknown_fields_in_a_body_get_422(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with running(_config(tmp_path, sqlite_url)) as gw:
        bob = await person(gw, "bob", "approver", groups=["compliance"])
        held = await send(gw, message())
        async with client(gw, bob) as http:
            broken = await http.post(
                f"/messages/{held}/approve",
                content=b'{"comment": ',
                headers={"Content-Type": "application/json"},
            )
            rerouted = await http.post(
                f"/messages/{held}/approve", json={"recipients": ["thief@evil.example"]}
            )
            no_reason = await http.post(f"/messages/{held}/reject", json={})
            state = (await http.get(f"/messages/{held}")).json()["state"]
    for answer in (broken, rerouted, no_reason):
        assert answer.status_code == 422
        assert "detail" in answer.json()
    assert state == "held"


async def test_auditor_reads_everything_but_decides_nothing_and_filters_the_audit_log(
    tmp_path: Path, sqlite_url: str
) -> None:
    async with running(_config(tmp_path, sqlite_url)) as gw:
        alice = await person(gw, "alice", "sender", emails=["alice@example.com"])
        frank = await person(gw, "frank", "auditor")
        first = await send(gw, message())
        second = await send(gw, message())
        async with client(gw, frank) as http:
            await http.get(f"/messages/{first}", params={"unmask": "true"})
            await http.get(f"/messages/{second}")
            approve = await http.post(f"/messages/{first}/approve")
            reject = await http.post(f"/messages/{first}/reject", json={"reason": "no"})
            views = await http.get("/audit", params={"event": "message.viewed", "actor": "frank"})
            one = await http.get("/audit", params={"id": second})
            paged = await http.get("/audit", params={"limit": 1})
            rest = await http.get("/audit", params={"cursor": paged.json()["next_cursor"]})
            future = await http.get("/audit", params={"since": "2999-01-01T00:00:00Z"})
        async with client(gw, alice) as http:
            sender_audit = await http.get("/audit")
    assert approve.status_code == 403 and reject.status_code == 403
    assert [e["id"] for e in views.json()["items"]] == [first, second]
    assert {e["event"] for e in one.json()["items"]} == {"message.accepted", "message.viewed"}
    assert len(paged.json()["items"]) == 1 and paged.json()["next_cursor"] == 1
    assert rest.json()["items"][0]["line"] == 2
    assert future.json()["items"] == []
    assert sender_audit.status_code == 403


async def test_list_filters_and_cursor_pages_oldest_first(tmp_path: Path, sqlite_url: str) -> None:
    async with running(_config(tmp_path, sqlite_url)) as gw:
        erin = await person(gw, "erin", "admin")
        ids = [await send(gw, message()) for _ in range(3)]
        other = await send(gw, message(), to="someone@globex.example")
        async with client(gw, erin) as http:
            first = (await http.get("/messages", params={"limit": 2})).json()
            second = (
                await http.get("/messages", params={"limit": 2, "cursor": first["next_cursor"]})
            ).json()
            globex = await http.get("/messages", params={"recipient_domain": "globex.example"})
            held = await http.get("/messages", params={"state": "held", "rule": "hold-all"})
            queued = (await http.get("/messages", params={"state": "queued"})).json()
            by_sender = await http.get("/messages", params={"sender": "ALICE@example.com"})
    assert [m["id"] for m in first["items"]] == ids[:2]
    assert [m["id"] for m in second["items"]] == [ids[2], other]
    assert [m["id"] for m in globex.json()["items"]] == [other]
    assert len(held.json()["items"]) == 4
    assert queued["items"] == [] and queued["next_cursor"] is None
    assert len(by_sender.json()["items"]) == 4


async def test_huge_request_bodies_get_413_json_not_500(tmp_path: Path, sqlite_url: str) -> None:
    async with running(_config(tmp_path, sqlite_url)) as gw:
        boss = await person(gw, "boss", "approver", groups=["compliance"])
        message_id = await send(gw, message())
        async with client(gw, boss) as http:
            declared = await http.post(
                f"/messages/{message_id}/reject",
                content=b'{"reason": "' + b"x" * 200_000 + b'"}',
                headers={"Content-Type": "application/json"},
            )

            async def chunks() -> AsyncIterator[bytes]:
                yield b'{"reason": "'
                for _ in range(50):
                    yield b"x" * 10_000
                yield b'"}'

            streamed = await http.post(
                f"/messages/{message_id}/reject",
                content=chunks(),
                headers={"Content-Type": "application/json"},
            )
            after = await http.get(f"/messages/{message_id}")
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert "larger than" in response.json()["detail"]
    assert after.status_code == 200 and after.json()["state"] == "held"
